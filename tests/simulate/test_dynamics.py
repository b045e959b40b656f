"""Users who differ and change: each mechanism shows in the tables, the truth follows it.

The mechanisms' tests run on a tiny catalogue with more users than the tiny preset and
each mechanism on its own at a strength above its "-v2" default (`DRIFT`, `NICHE`,
`FOCUS`), so that each effect stands well clear of sampling noise; the same world with
the mechanisms off is the control.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from funnelrec.data.dataset import Dataset
from funnelrec.errors import FunnelrecError
from funnelrec.simulate import PRESETS, build_world, generate, preset_config
from funnelrec.simulate.config import USER_DYNAMICS
from funnelrec.simulate.truth import World

SEED = 5
DAY = 86_400
SIZE = ["n_users=2000"]
# Each mechanism on its own, at a strength well above the "-v2" default.
DRIFT = ["drift_sd=0.3"]
NICHE = ["niche_rate=0.3", "tenure_mean_days=10"]
FOCUS = ["focus_sd=1.0", "activity_taste_corr=0.8"]
# The tiny preset's tables for seed 7, as generated before the users' mechanisms existed
# (`_content_digest`: floats to 6 significant digits).
TINY_SEED_7 = "1d3b5b5b110fd50e97bd4496337ac897b8391718c3286bb0746d54d0712b2ac5"


def _make(tmp: pytest.TempPathFactory, name: str, overrides: list[str]) -> Path:
    out = tmp.mktemp("dynamics") / name
    generate(preset_config("tiny", [*SIZE, *overrides]), SEED, out, progress=False)
    return out


@pytest.fixture(scope="module")
def off(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _make(tmp_path_factory, "off", [])


@pytest.fixture(scope="module")
def drift(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _make(tmp_path_factory, "drift", DRIFT)


@pytest.fixture(scope="module")
def niche(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _make(tmp_path_factory, "niche", NICHE)


@pytest.fixture(scope="module")
def focus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _make(tmp_path_factory, "focus", FOCUS)


@pytest.fixture(scope="module")
def uncorrelated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Focus as strong as in `focus`, but independent of activity."""
    return _make(tmp_path_factory, "uncorrelated", ["focus_sd=1.0", "activity_taste_corr=0"])


def _watches(path: Path) -> dict[str, np.ndarray]:
    t = Dataset.open(path).table("watches")
    return {
        "user": t["user_id"].to_numpy() - 1,
        "item": t["item_id"].to_numpy() - 1,
        "ts": t["ts"].to_numpy(),
        "source": np.asarray(t["source"].to_pylist()),
    }


def _search_topics(path: Path, world: World) -> dict[str, np.ndarray]:
    """Each search with a topic word: user index, time and the topic it was drawn from."""
    s = Dataset.open(path).table("searches")
    topic_of = {word: t for t, words in enumerate(world.vocab) for word in words}
    topic = np.array(
        [
            next((topic_of[w] for w in q.split() if w in topic_of), -1)
            for q in s["query"].to_pylist()
        ]
    )
    keep = topic >= 0
    return {
        "user": s["user_id"].to_numpy()[keep] - 1,
        "ts": s["ts"].to_numpy()[keep],
        "topic": topic[keep],
    }


def _same_topic_pairs(user: np.ndarray, ts: np.ndarray, topic: np.ndarray) -> dict[str, np.ndarray]:
    """Every pair of one user's searches: whether they share a topic, days apart, user."""
    order = np.lexsort((ts, user))
    user, ts, topic = user[order], ts[order], topic[order]
    starts = np.flatnonzero(np.r_[True, user[1:] != user[:-1]])
    same, gap, who = [], [], []
    for a, b in zip(starts, np.r_[starts[1:], user.size], strict=True):
        i, j = np.triu_indices(b - a, 1)
        same.append(topic[a + i] == topic[a + j])
        gap.append((ts[a + j] - ts[a + i]) / DAY)
        who.append(np.full(i.size, user[a]))
    return {"same": np.concatenate(same), "gap": np.concatenate(gap), "user": np.concatenate(who)}


def _drift_signal(path: Path) -> float:
    """How much more often two searches share a topic when days apart are few than many."""
    p = _same_topic_pairs(**_search_topics(path, World.load(path)))
    return float(p["same"][p["gap"] < 4].mean() - p["same"][p["gap"] >= 14].mean())


def _focus_signal(path: Path) -> float:
    """Heavy users' minus light users' chance that two of their searches share a topic.

    The chance is an unbiased estimate of sum_t p_t^2 however many searches a user made,
    averaged per user so heavy users' many pairs do not count more.
    """
    world = World.load(path)
    p = _same_topic_pairs(**_search_topics(path, world))
    n = np.bincount(p["user"], minlength=world.n_users)
    rate = np.bincount(p["user"], p["same"], minlength=world.n_users) / np.maximum(n, 1)
    activity = world.users["activity"]
    heavy = (activity >= np.quantile(activity, 0.8)) & (n > 0)
    light = (activity <= np.quantile(activity, 0.6)) & (n > 0)
    return float(rate[heavy].mean() - rate[light].mean())


def _niche_residuals(path: Path) -> dict[str, np.ndarray]:
    """Search watches: log appeal minus its mean over a popularity draw of the topic then.

    A search picks among items drawn by popularity (appeal x freshness) from its topic,
    so without the niche mechanism the residual averages 0 whatever the catalogue and
    the day; a user who has moved to niche items picks below it.
    """
    world = World.load(path)
    w = _watches(path)
    rows = w["source"] == "search"
    user, item, ts = w["user"][rows], w["item"][rows], w["ts"][rows]
    log_appeal = np.log(world.appeal.astype(np.float64))
    expected = np.empty(item.size)
    for t in np.unique(world.topic[item]):
        rows, members = world.topic[item] == t, np.flatnonzero(world.topic == t)
        age = ts[rows, None] - world.upload_ts[members]
        weight = world.appeal[members] * world.popularity.freshness(age)
        expected[rows] = (weight * log_appeal[members]).sum(axis=1) / weight.sum(axis=1)
    return {"user": user, "ts": ts, "residual": log_appeal[item] - expected}


def _next_episode_share(path: Path) -> tuple[float, float]:
    """Heavy and light users' share of related watches after an episode that go to the next."""
    world = World.load(path)
    w = _watches(path)
    a, b = w["item"][:-1], w["item"][1:]
    nxt = world.next_episode[a]
    after_episode = (w["user"][1:] == w["user"][:-1]) & (w["source"][1:] == "related")
    after_episode &= (nxt >= 0) & (world.upload_ts[np.maximum(nxt, 0)] <= w["ts"][1:])
    to_next = after_episode & (b == nxt)
    activity = world.users["activity"][w["user"][:-1]]
    q80, q60 = np.quantile(world.users["activity"], [0.8, 0.6])
    heavy, light = after_episode & (activity >= q80), after_episode & (activity <= q60)
    return float(to_next[heavy].sum() / heavy.sum()), float(to_next[light].sum() / light.sum())


def _content_digest(path: Path, *, exact: bool = False) -> str:
    """A digest of the tables' values (not their files, whose bytes depend on the writer).
    Floats count to 6 significant digits: numpy's vectorised exp and log differ in the last
    bits between CPUs (with AVX-512 or without), and the pinned world must not depend on
    the CPU it is checked on (`exact`: every bit, for two runs on one machine)."""
    ds = Dataset.open(path)
    h = hashlib.sha256()
    for name in ("users", "items", "watches", "searches", "impressions"):
        table = ds.table(name)
        for col in table.column_names:
            h.update(col.encode())
            values = table[col].to_pylist()
            if not exact:
                values = [f"{v:.6g}" if isinstance(v, float) else v for v in values]
            h.update("\x1f".join(map(str, values)).encode())
    return h.hexdigest()


# -- reproducibility -----------------------------------------------------------------------


def test_presets_without_v2_keep_the_worlds_they_gave_before(tmp_path: Path) -> None:
    """The mechanisms are off in the old presets and draw nothing when off: the tiny world of
    seed 7 holds exactly the values it held before they existed."""
    for name, config in PRESETS.items():
        if name.endswith("-v2"):
            base = PRESETS[name.removesuffix("-v2")]
            assert config == replace(base, **USER_DYNAMICS)
        else:
            assert (config.drift_sd, config.niche_rate, config.focus_sd) == (0.0, 0.0, 0.0)
    out = generate(preset_config("tiny"), 7, tmp_path / "tiny", progress=False).path
    assert _content_digest(out) == TINY_SEED_7
    assert set(World.load(out).users) == {
        "interest", "taste", "activity", "age", "gender", "region", "device", "logged_in"
    }  # fmt: skip


def test_v2_worlds_are_deterministic_and_round_trip(tmp_path: Path) -> None:
    config = preset_config("tiny-v2", ["n_users=300", "days=5"])
    a = generate(config, 3, tmp_path / "a", progress=False).path
    b = generate(config, 3, tmp_path / "b", progress=False).path
    assert _content_digest(a, exact=True) == _content_digest(b, exact=True)
    loaded, built = World.load(a), build_world(config, 3)
    for name in ("interest", "activity", "focus", "tenure_days"):
        assert np.array_equal(loaded.users[name], built.users[name]), name
    assert loaded.p_next_episode is not None and built.p_next_episode is not None
    assert np.array_equal(loaded.p_next_episode, built.p_next_episode)
    users, ts = np.arange(1, 301), loaded.window_start + 3 * DAY + 5
    assert np.array_equal(loaded.interest_at(users, ts), built.interest_at(users, ts))


def test_a_version_1_truth_reads_as_a_world_without_the_mechanisms(
    tmp_path: Path,
) -> None:
    config = preset_config("tiny", ["n_users=50", "days=3"])
    out = generate(config, 1, tmp_path / "v1", progress=False).path
    meta_file = out / "truth" / "world.json"
    meta = json.loads(meta_file.read_text())
    meta["format_version"] = 1
    for key in USER_DYNAMICS:
        del meta["config"][key]
    meta_file.write_text(json.dumps(meta))
    world = World.load(out)
    assert not world.dynamics.drifts and not world.dynamics.niches
    assert world.p_next_episode is None
    assert np.allclose(world.interest_at([1, 2], world.window_end), world.interest[:2])


def test_the_mechanisms_settings_are_checked() -> None:
    for bad, match in (
        ("drift_sd=1.5", r"drift_sd must be in \[0, 1\]"),
        ("activity_taste_corr=-1.2", r"activity_taste_corr must be in \[-1, 1\]"),
        ("focus_sd=-0.1", "focus_sd must be >= 0"),
        ("niche_rate=-1", "niche_rate must be >= 0"),
        ("tenure_mean_days=0", "tenure_mean_days must be > 0"),
    ):
        with pytest.raises(FunnelrecError, match=match):
            preset_config("tiny-v2", [bad])


# -- interest drift ------------------------------------------------------------------------


def test_drift_shows_in_the_tables(off: Path, drift: Path) -> None:
    """Two searches of a user share a topic more often a few days apart than weeks apart,
    with drift; without it the gap makes no difference."""
    assert abs(_drift_signal(off)) < 0.025
    assert _drift_signal(drift) > _drift_signal(off) + 0.035


def test_searches_follow_the_drifted_interests(off: Path, drift: Path) -> None:
    """The generator draws topics from the interests of the day: the searched topics are
    likelier under `interest_at(ts)` than under the mixture at the window's start."""
    for path, drifts in ((off, False), (drift, True)):
        world = World.load(path)
        s = _search_topics(path, world)
        now = world.interest_at(s["user"] + 1, s["ts"])[np.arange(s["topic"].size), s["topic"]]
        start = world.interest[s["user"], s["topic"]]
        gain = np.mean(np.log(now + 1e-9) - np.log(start + 1e-9))
        if drifts:
            assert gain > 0.05
        else:
            assert np.allclose(now, start, rtol=1e-5)


def test_the_oracle_reads_the_drifted_state(drift: Path, off: Path) -> None:
    """The truth at ts is the truth of a world whose users hold ts's interests: the oracle
    ranks by the drifted state, which changes from day to day only with drift on."""
    static = World.load(off)
    users = np.arange(1, 41)
    early, late = static.window_start + 2 * DAY + 7, static.window_start + 25 * DAY + 7
    assert np.array_equal(static.interest_at(users, early), static.interest_at(users, late))
    items = np.arange(1, 31)
    assert np.array_equal(
        static.affinity(users[:, None], items, early), static.affinity(users[:, None], items, late)
    )

    world = World.load(drift)
    moved = 0.5 * np.abs(world.interest_at(users, early) - world.interest_at(users, late)).sum(1)
    assert moved.mean() > 0.1
    assert not np.allclose(
        world.affinity(users[:, None], items, early), world.affinity(users[:, None], items, late)
    )
    for ts in (early, late):
        meta = json.loads(json.dumps(world.meta))
        meta["config"]["drift_sd"] = 0.0
        frozen_users = dict(world.users)
        frozen_users["interest"] = np.zeros_like(world.interest)
        frozen_users["interest"][users - 1] = world.interest_at(users, ts)
        frozen = World(
            meta=meta,
            model=world.model,
            users=frozen_users,
            items=world.items,
            channels=world.channels,
        )
        all_items = np.arange(1, world.n_items + 1)
        np.testing.assert_allclose(
            world.watch_rate(users[:, None], all_items, ts),
            frozen.watch_rate(users[:, None], all_items, ts),
            rtol=1e-5,
        )
        assert np.array_equal(world.oracle_top_k(users, ts, 20), frozen.oracle_top_k(users, ts, 20))
    top_early = world.oracle_top_k(users, early, 20)
    assert not np.array_equal(top_early, world.oracle_top_k(users, early + DAY, 20))


def test_logged_topic_scores_use_the_interests_of_the_day(drift: Path) -> None:
    """cand_score of a personalised slot is the policy's probability under the drifted
    interests at the request (the same formula as for a static world)."""
    world = World.load(drift)
    imp = Dataset.open(drift).table("impressions")
    assert imp.schema.field("cand_source").type == pa.string()
    assert imp["cand_source"].null_count == 0 and imp["cand_score"].null_count == 0
    source = np.asarray(imp["cand_source"].to_pylist())
    score = imp["cand_score"].to_numpy()
    assert np.isfinite(score).all() and (score > 0).all() and (score <= 1).all()
    rows = np.flatnonzero(source == "topic")
    u = imp["user_id"].to_numpy()[rows] - 1
    i = imp["item_id"].to_numpy()[rows] - 1
    ts = imp["ts"].to_numpy()[rows]
    config = preset_config("tiny", [*SIZE, *DRIFT])
    logged_in = np.asarray(world.users["logged_in"], dtype=bool)[u]
    noise = np.where(logged_in, config.policy_noise, config.policy_noise_logged_out)
    topic = world.topic[i]
    n_topics = len(world.topics)
    interest = world.interest_at(u + 1, ts)[np.arange(rows.size), topic]
    topic_mass = np.zeros(rows.size)
    for t in np.unique(topic):
        topic_mass[topic == t] = world.popularity.mass(int(t), ts[topic == t])
    share = world.popularity.weight(i, ts) / topic_mass
    expected = ((1 - noise) * interest + noise / n_topics) * share
    np.testing.assert_allclose(score[rows], expected, rtol=1e-5)
    static = ((1 - noise) * world.interest[u, topic] + noise / n_topics) * share
    assert np.abs(score[rows] / static - 1).mean() > 0.05


# -- popular to niche ----------------------------------------------------------------------


def test_users_move_from_popular_to_niche(off: Path, niche: Path) -> None:
    """Searches pick less popular items than a popularity draw of their topic, the more so
    later in the window; without the mechanism they pick at the popularity draw's mean."""
    for path, on in ((off, False), (niche, True)):
        world = World.load(path)
        r = _niche_residuals(path)
        day = (r["ts"] - world.window_start) // DAY
        shift = r["residual"][day >= 18].mean() - r["residual"][day < 10].mean()
        if on:
            assert r["residual"].mean() < -0.25
            assert shift < -0.1
        else:
            assert abs(r["residual"].mean()) < 0.06
            assert abs(shift) < 0.08


def test_the_niche_exponent_grows_with_experience(niche: Path, off: Path) -> None:
    world = World.load(niche)
    users = np.arange(1, world.n_users + 1)
    nu_start = world.niche(users, world.window_start)
    nu_end = world.niche(users, world.window_end)
    assert (nu_end > nu_start).all() and (nu_start >= 0).all()
    tenure = world.users["tenure_days"]
    assert np.corrcoef(tenure, nu_start)[0, 1] > 0.3
    # The same item is preferred less by the same user once they have moved to niche items,
    # the more so the more popular it is.
    popular = np.argsort(world.appeal)[-20:] + 1
    first, last = world.window_start, world.window_end - 1
    drop = world.affinity(users[:100, None], popular, first) - world.affinity(
        users[:100, None], popular, last
    )
    assert (drop > 0).all()
    assert (World.load(off).niche(users, world.window_end) == 0).all()


# -- activity linked to taste --------------------------------------------------------------


def test_heavy_users_keep_to_fewer_topics(off: Path, focus: Path, uncorrelated: Path) -> None:
    """Heavy users' searches share a topic more often than light users', with focus
    correlated with activity; with focus independent of activity, or off, they do not."""
    assert _focus_signal(focus) > 0.15
    assert abs(_focus_signal(off)) < 0.1
    assert abs(_focus_signal(uncorrelated)) < 0.1
    for path, corr in ((focus, True), (uncorrelated, False), (off, False)):
        world = World.load(path)
        p = world.interest.astype(np.float64)
        entropy = -(p * np.log(np.maximum(p, 1e-30))).sum(axis=1)
        r = np.corrcoef(np.log(world.users["activity"]), entropy)[0, 1]
        assert r < -0.3 if corr else abs(r) < 0.1


def test_heavy_users_binge_series(off: Path, focus: Path, uncorrelated: Path) -> None:
    """After an episode, heavy users go on to the next one more often than light users
    when focus follows activity; the controls show no such gap."""
    gap = {name: np.subtract(*_next_episode_share(path)) for name, path in
           (("off", off), ("focus", focus), ("uncorrelated", uncorrelated))}  # fmt: skip
    assert gap["focus"] > 0.1
    assert gap["focus"] > max(gap["off"], gap["uncorrelated"]) + 0.1
    world = World.load(focus)
    assert world.p_next_episode is not None
    assert np.corrcoef(np.log(world.users["activity"]), world.p_next_episode)[0, 1] > 0.3
    assert World.load(off).p_next_episode is None


# -- the truth with the mechanisms on (its closed forms: test_truth.py, preset tiny-v2) --


def test_v2_config_is_recorded_in_the_truth(tmp_path: Path) -> None:
    config = preset_config("tiny-v2", ["n_users=40", "days=2"])
    out = generate(config, 2, tmp_path / "meta", preset="tiny-v2", progress=False).path
    meta = json.loads((out / "truth" / "world.json").read_text())
    assert meta["format_version"] == 2
    assert {k: meta["config"][k] for k in USER_DYNAMICS} == {
        k: asdict(config)[k] for k in USER_DYNAMICS
    }
