"""The ground truth agrees with the data it generated, and its functions behave as stated."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from funnelrec.data.dataset import Dataset
from funnelrec.errors import ArtifactError, DataError
from funnelrec.simulate import build_world, generate, preset_config
from funnelrec.simulate.truth import World, _search, order_by

SEED = 11


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("truth") / "tiny"
    generate(preset_config("tiny"), SEED, out, preset="tiny", progress=False)
    return out


@pytest.fixture(scope="module")
def world(tiny: Path) -> World:
    return World.load(tiny)


def _times_shown(user: np.ndarray, item: np.ndarray, ts: np.ndarray) -> np.ndarray:
    """How often each impression's item was shown to its user before (from the data)."""
    o = order_by(user, item, ts)
    key = user[o] * (1 << 32) + item[o]
    new = np.r_[True, key[1:] != key[:-1]]
    starts = np.flatnonzero(new)
    shown = np.empty(user.size, dtype=np.int64)
    shown[o] = np.arange(user.size) - starts[np.cumsum(new) - 1]
    return shown


def test_load_gives_back_the_world_that_generated_the_data(tiny: Path, world: World) -> None:
    built = build_world(preset_config("tiny"), SEED, "tiny")
    for name in ("interest", "taste", "activity", "age"):
        assert np.array_equal(world.users[name], built.users[name])
    for name, values in built.items.items():
        assert np.array_equal(world.items[name], values), name
    assert world.model == built.model
    assert world.topics == built.topics and world.vocab == built.vocab
    assert (world.window_start, world.window_end) == (built.window_start, built.window_end)
    assert np.allclose(world.interest.sum(axis=1), 1.0, atol=1e-5)
    meta = json.loads((tiny / "truth" / "world.json").read_text())
    assert meta["seed"] == SEED and meta["config"]["n_users"] == 500


def test_observed_ctr_matches_click_probability_by_decile(tiny: Path, world: World) -> None:
    imp = Dataset.open(tiny).table("impressions")
    user, item = imp["user_id"].to_numpy(), imp["item_id"].to_numpy()
    ts = imp["ts"].to_numpy()
    clicked = imp["clicked"].to_numpy(zero_copy_only=False)
    p = world.click_probability(user, item, ts, _times_shown(user, item, ts))
    edges = np.quantile(p, np.linspace(0, 1, 11)[1:-1])
    decile = np.digitize(p, edges)
    for d in range(10):
        rows = decile == d
        predicted, observed = p[rows].mean(), clicked[rows].mean()
        se = np.sqrt(predicted * (1 - predicted) / rows.sum())
        assert abs(observed - predicted) < 4 * se + 1e-3, (d, predicted, observed)
    # Ignoring how often an item was shown overstates clicks: the churn effect is real.
    assert world.click_probability(user, item, ts).mean() > clicked.mean() * 1.05


def test_watch_time_matches_expected_watch_time(tiny: Path, world: World) -> None:
    w = Dataset.open(tiny).table("watches")
    user, item = w["user_id"].to_numpy(), w["item_id"].to_numpy()
    observed = w["watch_time_s"].to_numpy().astype(np.float64)
    expected = world.watch_time_if_clicked(user, item)
    assert abs(observed.mean() / expected.mean() - 1) < 0.03
    quintile = np.digitize(expected, np.quantile(expected, [0.2, 0.4, 0.6, 0.8]))
    for q in range(5):
        rows = quintile == q
        assert abs(observed[rows].mean() / expected[rows].mean() - 1) < 0.1
    assert np.allclose(expected, world.completion(user, item) * world.duration_s[item - 1])


def test_sample_response_draws_clicks_and_watch_times_from_the_model(world: World) -> None:
    n = 50_000
    user, item = np.full(n, 3), np.full(n, world.n_items // 2)
    ts = world.window_end
    clicked, watch_time = world.sample_response(user, item, ts, rng=np.random.default_rng(5))
    p = world.click_probability(3, world.n_items // 2, ts)
    assert abs(clicked.mean() - p) < 4 * np.sqrt(p * (1 - p) / n)
    assert (watch_time[~clicked] == 0).all() and (watch_time[clicked] > 0).all()
    expected = world.watch_time_if_clicked(3, world.n_items // 2)
    assert abs(watch_time[clicked].mean() / expected - 1) < 0.05
    assert (watch_time <= world.duration_s[world.n_items // 2 - 1]).all()


def test_user_model_moves_in_the_stated_directions() -> None:
    world = build_world(preset_config("tiny"), SEED)  # writable arrays
    rng = np.random.default_rng(0)
    n = 2_000
    user = rng.integers(1, world.n_users + 1, n)
    item = rng.integers(1, world.n_items + 1, n)
    ts = np.full(n, world.window_end)
    p0 = world.click_probability(user, item, ts)
    assert (world.click_probability(user, item, ts, 2) < p0).all()
    e = world.expected_watch_time(user, item, ts)
    assert np.allclose(e, p0 * world.watch_time_if_clicked(user, item))
    c0 = world.completion(user, item)
    world.clickbait[item - 1] += 1.0
    try:
        assert (world.click_probability(user, item, ts) > p0).all()
        assert (world.completion(user, item) <= c0).all()
    finally:
        world.clickbait[item - 1] -= 1.0
    world.quality[item - 1] += 1.0
    try:
        assert (world.completion(user, item) > c0).all()
        assert np.allclose(world.click_probability(user, item, ts), p0)
    finally:
        world.quality[item - 1] -= 1.0
    # Before its upload an item can be neither clicked nor picked.
    late = np.argsort(world.upload_ts)[-10:] + 1
    before = world.upload_ts[late - 1] - 1
    assert (world.click_probability(1, late, before) == 0).all()
    assert (world.watch_rate(1, late, before) == 0).all()
    # Freshness: the same item is watched more right after its upload than weeks later.
    fresh = world.watch_rate(1, late, world.upload_ts[late - 1] + 3600)
    old = world.watch_rate(1, late, world.upload_ts[late - 1] + 30 * 86_400)
    assert (fresh > old).all()


def test_oracle_top_k_ranks_by_the_truth(world: World) -> None:
    users = np.arange(1, 21)
    ts = world.window_start + 10 * 86_400
    top = world.oracle_top_k(users, ts, 50)
    assert top.shape == (20, 50) and (top > 0).all()
    scores = world.watch_rate(users[:, None], top, ts)
    assert (np.diff(scores, axis=1) <= 1e-12).all()
    assert (world.upload_ts[top - 1] <= ts).all()
    # No item outside the top scores more than the worst one inside it.
    everything = world.watch_rate(users[:, None], np.arange(1, world.n_items + 1), ts)
    assert np.allclose(np.sort(everything, axis=1)[:, -50:][:, ::-1], scores)
    excluded = world.oracle_top_k(users, ts, 50, exclude=[row[:5] for row in top])
    assert not np.isin(excluded[0], top[0, :5]).any()
    assert np.array_equal(excluded[:, :45], top[:, 5:])
    by_watch = world.oracle_top_k(users, ts, 10, by="expected_watch_time")
    ewt = world.expected_watch_time(users[:, None], by_watch, ts)
    assert (np.diff(ewt, axis=1) <= 1e-9).all()
    # Early in the pre-window period few items exist: the rest is padded with 0.
    first = np.sort(world.upload_ts)[2]
    padded = world.oracle_top_k([1], first, 10)
    assert (padded[0, :3] > 0).all() and (padded[0, 3:] == 0).all()


def test_oracle_predicts_next_watches_better_than_popularity(tiny: Path, world: World) -> None:
    w = Dataset.open(tiny).table("watches")
    user, item, ts = w["user_id"].to_numpy(), w["item_id"].to_numpy(), w["ts"].to_numpy()
    last = np.r_[user[1:] != user[:-1], True]  # rows are ordered by user, then time
    history = ~last
    popular = np.argsort(-np.bincount(item[history], minlength=world.n_items + 1))[:100]
    top = world.oracle_top_k(user[last], ts[last], 100)
    oracle = (top == item[last][:, None]).any(axis=1).mean()
    baseline = np.isin(item[last], popular).mean()
    assert oracle > baseline + 0.1


@pytest.mark.parametrize("preset", ["tiny", "tiny-v2"])  # -v2: the users' mechanisms on
def test_watch_rate_adds_up_to_the_observed_watches_per_session(
    tmp_path: Path, preset: str
) -> None:
    """Summed over items, watch_rate is the expected number of non-related watches.

    watch_rate is for an item never shown to the user before, so the check runs on a
    world without that churn effect.
    """
    config = preset_config(preset, ["days=10", "user_model.click_shown=0"])
    out = generate(config, SEED, tmp_path / "no_churn", progress=False).path
    world = World.load(out)
    ds = Dataset.open(out)
    imp = ds.table("impressions")
    first = np.r_[True, np.diff(imp["request_id"].to_numpy()) != 0]
    searches = ds.table("searches")
    w = ds.table("watches")
    external = np.asarray(w["source"].to_pylist()) == "external"
    sessions_user = np.concatenate(
        [imp["user_id"].to_numpy()[first], searches["user_id"].to_numpy(),
         w["user_id"].to_numpy()[external]]
    )  # fmt: skip
    sessions_ts = np.concatenate(
        [imp["ts"].to_numpy()[first], searches["ts"].to_numpy(), w["ts"].to_numpy()[external]]
    )
    sources = np.asarray(w["source"].to_pylist())
    observed = (sources != "related").sum() / sessions_user.size
    pick = np.random.default_rng(3).choice(sessions_user.size, 300, replace=False)
    items = np.arange(1, world.n_items + 1)
    rate = world.watch_rate(sessions_user[pick, None], items[None, :], sessions_ts[pick, None])
    assert abs(rate.sum(axis=1).mean() / observed - 1) < 0.1


def test_popularity_draws_follow_the_true_weights(world: World) -> None:
    pop = world.popularity
    rng = np.random.default_rng(1)
    ts = world.window_start + 5 * 86_400 + 1234
    n = 200_000
    for segment in (int(np.bincount(world.topic).argmax()), len(world.topics)):
        drawn = pop.draw(rng, np.full(n, ts), segment)
        members = np.arange(world.n_items) if segment == len(world.topics) else None
        if members is None:
            members = np.flatnonzero(world.topic == segment)
        weight = pop.weight(members, np.full(members.size, ts))
        assert np.isclose(weight.sum(), pop.mass(segment, np.array([ts]))[0])
        freq = np.bincount(drawn, minlength=world.n_items)[members] / n
        assert 0.5 * np.abs(freq - weight / weight.sum()).sum() < 0.02
        assert (world.upload_ts[drawn] <= ts).all()


def test_bad_ids_and_missing_truth_are_clear_errors(
    tiny: Path, world: World, tmp_path: Path
) -> None:
    with pytest.raises(DataError, match="item_id 1001 is out of range"):
        world.click_probability([1], [1001], [world.window_start])
    with pytest.raises(DataError, match="user_id 0 is out of range"):
        world.oracle_top_k([0], world.window_start, 5)
    with pytest.raises(ArtifactError, match="no ground truth"):
        World.load(tmp_path)
    bad = tmp_path / "bad"
    bad.mkdir()
    meta = json.loads((tiny / "truth" / "world.json").read_text())
    meta["format_version"] = 99
    (bad / "world.json").write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match="format version 99"):
        World.load(bad)


def test_sorting_helpers_match_numpy() -> None:
    rng = np.random.default_rng(2)
    a, b = rng.integers(0, 50, 100_000), rng.integers(-(10**9), 10**9, 100_000)
    assert np.array_equal(order_by(a, b), np.lexsort((b, a)))
    big = rng.integers(0, 1 << 40, 1_000)
    assert np.array_equal(order_by(big, big, big), np.lexsort((big, big, big)))  # fallback
    cum = np.cumsum(rng.random(10_000))
    x = rng.random(100_000) * cum[-1]
    assert (np.abs(_search(cum, x) - np.searchsorted(cum, x, side="right")) <= 1).all()
    assert (_search(cum, x) == np.searchsorted(cum, x, side="right")).mean() > 0.999
