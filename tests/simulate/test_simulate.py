"""The simulated world shows the properties the paper's findings rest on (tiny preset)."""

from __future__ import annotations

import hashlib
from dataclasses import fields
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import typer
from typer.testing import CliRunner

from funnelrec.cli.simulate import simulate
from funnelrec.data.dataset import Dataset
from funnelrec.data.schema import TABLE_NAMES, validate_table
from funnelrec.errors import FunnelrecError
from funnelrec.simulate import (
    POLICY_SOURCES,
    PRESETS,
    SimConfig,
    apply_overrides,
    generate,
    preset_config,
)
from funnelrec.simulate.truth import UserModel, World

SEED = 7


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("sim") / "tiny"
    generate(preset_config("tiny"), SEED, out, preset="tiny", progress=False)
    return out


def _watches(path: Path) -> dict[str, np.ndarray]:
    t = Dataset.open(path).table("watches")
    return {
        "user": t["user_id"].to_numpy(),
        "item": t["item_id"].to_numpy(),
        "ts": t["ts"].to_numpy(),
        "watch_time": t["watch_time_s"].to_numpy(),
        "source": np.asarray(t["source"].to_pylist()),
    }


def _chance(predicted: np.ndarray, actual: np.ndarray) -> float:
    """Accuracy of the same predictions if they were independent of the answers."""
    n = max(int(predicted.max()), int(actual.max())) + 1
    p = np.bincount(predicted, minlength=n) / predicted.size
    q = np.bincount(actual, minlength=n) / actual.size
    return float(p @ q)


def _hashes(path: Path) -> dict[str, str]:
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*.parquet"))
    }


def test_tables_pass_validation_and_are_consistent(tiny: Path) -> None:
    ds = Dataset.open(tiny)
    assert ds.manifest.source == "simulate"
    for name in TABLE_NAMES:
        assert ds.has(name)
        table = ds.table(name)
        validate_table(name, table, name)
        assert table.num_rows == ds.num_rows(name) > 0
    assert ds.num_rows("users") == 500 and ds.num_rows("items") == 1_000
    assert ds.id_map("user")["raw_id"][0].as_py() == "u1"
    assert ds.id_map("item").num_rows == 1_000
    users = ds.table("users")
    logged_out = ~users["logged_in"].to_numpy(zero_copy_only=False)
    assert logged_out.any()
    assert np.array_equal(users["age"].is_null().to_numpy(zero_copy_only=False), logged_out)

    w = _watches(tiny)
    world = World.load(tiny)
    # Nothing is watched before its upload; sessions start inside the window.
    assert (w["ts"] >= world.upload_ts[w["item"] - 1]).all()
    assert w["ts"].min() >= world.window_start
    # Events are ordered by user, then time.
    key = w["user"] * (1 << 32) + (w["ts"] - world.window_start)
    assert (np.diff(key) >= 0).all()
    assert set(np.unique(w["source"])) == {"home", "search", "related", "external"}

    imp = ds.table("impressions")
    clicked = imp["clicked"].to_numpy(zero_copy_only=False)
    wt = imp["watch_time_s"].to_numpy()
    assert (wt[~clicked] == 0).all() and (wt[clicked] > 0).mean() > 0.99
    # Every click is a home watch, and every home watch a click.
    assert clicked.sum() == (w["source"] == "home").sum()
    pos = imp["position"].to_numpy()
    assert pos.min() == 0 and pos.max() == PRESETS["tiny"].slate_size - 1
    # No item twice in one slate.
    pairs = imp["request_id"].to_numpy() * (1 << 32) + imp["item_id"].to_numpy()
    assert np.unique(pairs).size == pairs.size
    queries = ds.table("searches")["query"]
    n_tokens = pc.list_value_length(pc.split_pattern(queries, " ")).to_numpy()
    assert n_tokens.min() >= 1 and n_tokens.max() <= 3


def _policy_log(path: Path) -> dict[str, np.ndarray]:
    imp = Dataset.open(path).table("impressions")
    assert imp.schema.field("cand_source").type == pa.string()
    assert imp.schema.field("cand_score").type == pa.float64()
    assert imp["cand_source"].null_count == 0 and imp["cand_score"].null_count == 0
    return {
        "user": imp["user_id"].to_numpy() - 1,
        "item": imp["item_id"].to_numpy() - 1,
        "ts": imp["ts"].to_numpy(),
        "clicked": imp["clicked"].to_numpy(zero_copy_only=False),
        "source": np.asarray(imp["cand_source"].to_pylist()),
        "score": imp["cand_score"].to_numpy(),
    }


def _shares(source: np.ndarray) -> dict[str, float]:
    return {s: float((source == s).mean()) for s in POLICY_SOURCES}


def test_impressions_log_the_policy_source_and_its_score(tiny: Path) -> None:
    """cand_source names the policy's source of each slot, cand_score its draw probability."""
    log = _policy_log(tiny)
    assert POLICY_SOURCES == ("popular", "fresh", "topic")
    assert set(np.unique(log["source"])) == set(POLICY_SOURCES)
    score = log["score"]
    assert np.isfinite(score).all() and (score > 0).all() and (score <= 1).all()

    # Each score, recomputed from the truth: the probability that one draw of the source
    # picks the item for this user at this time.
    world = World.load(tiny)
    config = PRESETS["tiny"]
    pop, n_topics = world.popularity, len(world.topics)
    u, i, ts, src = log["user"], log["item"], log["ts"], log["source"]
    weight = pop.weight(i, ts)
    assert (weight > 0).all()  # nothing is shown before its upload
    expected = np.full(score.size, np.nan)
    m = src == "popular"
    expected[m] = weight[m] / pop.mass(n_topics, ts[m])
    m = src == "fresh"
    window = config.fresh_window_hours * 3600
    assert (ts[m] - world.upload_ts[i[m]] < window).all()  # fresh items are recent
    uploads = np.sort(world.upload_ts)
    n_recent = np.searchsorted(uploads, ts[m], "right") - np.searchsorted(
        uploads, ts[m] - window, "right"
    )
    expected[m] = 1.0 / n_recent
    m = np.flatnonzero(src == "topic")
    topic = world.topic[i[m]]
    logged_in = np.asarray(world.users["logged_in"], dtype=bool)[u[m]]
    noise = np.where(logged_in, config.policy_noise, config.policy_noise_logged_out)
    p_topic = (1 - noise) * world.interest[u[m], topic] + noise / n_topics
    topic_mass = np.zeros(m.size)
    for t in np.unique(topic):
        topic_mass[topic == t] = pop.mass(int(t), ts[m][topic == t])
    expected[m] = p_topic * weight[m] / topic_mass
    np.testing.assert_allclose(score, expected, rtol=1e-6)

    # Personalised slots are clicked far more often than popular ones.
    ctr = {s: log["clicked"][src == s].mean() for s in POLICY_SOURCES}
    assert ctr["topic"] > 1.5 * ctr["popular"]


@pytest.mark.parametrize("popular, fresh", [(0.3, 0.2), (0.1, 0.5)])
def test_policy_sources_follow_the_configured_shares(
    tiny: Path, tmp_path: Path, popular: float, fresh: float
) -> None:
    """Each source's share of the slots is the config's; fallbacks add to popular (the tiny
    world has empty topics), duplicates dropped within a slate take a little from each."""
    if (popular, fresh) == (PRESETS["tiny"].policy_popular, PRESETS["tiny"].policy_fresh):
        path = tiny
    else:
        overrides = [f"policy_popular={popular}", f"policy_fresh={fresh}", "n_users=200"]
        config = preset_config("tiny", [*overrides, "days=7"])
        path = generate(config, SEED, tmp_path / "policy", progress=False).path
    shares = _shares(_policy_log(path)["source"])
    assert shares["fresh"] == pytest.approx(fresh, abs=0.04)
    assert popular - 0.02 < shares["popular"] < popular + 0.1
    assert 1 - popular - fresh - 0.1 < shares["topic"] < 1 - popular - fresh + 0.02


def test_same_seed_gives_identical_tables(tiny: Path, tmp_path: Path) -> None:
    again = generate(preset_config("tiny"), SEED, tmp_path / "again", progress=False).path
    assert _hashes(again) == _hashes(tiny)
    other = generate(preset_config("tiny"), SEED + 1, tmp_path / "other", progress=False).path
    assert _hashes(other)["watches.parquet"] != _hashes(tiny)["watches.parquet"]


def test_blocks_stream_the_same_world(tmp_path: Path) -> None:
    """Many small blocks: valid tables, unique request ids, users in order across blocks."""
    config = preset_config("tiny", ["n_users=200", "days=5", "block_user_days=100"])
    assert config.users_per_block == 20
    out = generate(config, SEED, tmp_path / "blocks", progress=False).path
    ds = Dataset.open(out)
    req = ds.table("impressions")["request_id"].to_numpy()
    assert (np.diff(req) >= 0).all() and np.unique(req).size == req.max() - req.min() + 1
    users = ds.table("watches")["user_id"].to_numpy()
    assert (np.diff(users) >= 0).all() and np.unique(users).size > 100


def test_activity_is_heavy_tailed(tiny: Path) -> None:
    per_user = np.bincount(_watches(tiny)["user"], minlength=501)[1:]
    top = np.sort(per_user)[::-1][: len(per_user) // 100]
    assert top.sum() >= 0.10 * per_user.sum()


def test_watches_concentrate_in_first_days_after_upload(tiny: Path) -> None:
    w = _watches(tiny)
    world = World.load(tiny)
    upload = world.upload_ts[w["item"] - 1]
    # Items uploaded in the window with at least two weeks of it left to be watched.
    keep = (upload >= world.window_start) & (upload < world.window_end - 14 * 86_400)
    age_days = (w["ts"] - upload)[keep] / 86_400
    first_two_days = (age_days < 2).sum() / 2
    second_week = ((age_days >= 7) & (age_days < 14)).sum() / 7
    assert first_two_days > 3 * second_week


def test_next_episode_follows_far_more_than_previous(tiny: Path) -> None:
    w = _watches(tiny)
    world = World.load(tiny)
    same_user = w["user"][1:] == w["user"][:-1]
    a, b = w["item"][:-1][same_user] - 1, w["item"][1:][same_user] - 1
    series = (world.series_id[a] > 0) & (world.series_id[a] == world.series_id[b])
    forward = (series & (world.episode[b] == world.episode[a] + 1)).sum()
    backward = (series & (world.episode[b] == world.episode[a] - 1)).sum()
    assert forward >= 100
    assert forward > 4 * backward


def test_related_watches_lead_from_popular_to_niche_within_a_topic(tiny: Path) -> None:
    w = _watches(tiny)
    world = World.load(tiny)
    same_user = w["user"][1:] == w["user"][:-1]
    a, b = w["item"][:-1] - 1, w["item"][1:] - 1
    related = same_user & (w["source"][1:] == "related") & (world.series_id[b] == 0)
    assert related.sum() > 1_000
    assert (world.topic[a[related]] == world.topic[b[related]]).mean() > 0.9
    log_appeal = np.log(world.appeal)
    assert log_appeal[b[related]].mean() < log_appeal[a[related]].mean() - 0.08


def test_clickbait_raises_ctr_but_lowers_watch_time_per_click(tiny: Path) -> None:
    imp = Dataset.open(tiny).table("impressions")
    world = World.load(tiny)
    clickbait = world.clickbait[imp["item_id"].to_numpy() - 1]
    clicked = imp["clicked"].to_numpy(zero_copy_only=False)
    wt = imp["watch_time_s"].to_numpy()
    duration = world.duration_s[imp["item_id"].to_numpy() - 1]
    low, high = np.quantile(clickbait, [0.25, 0.75])
    lo, hi = clickbait <= low, clickbait >= high
    assert clicked[hi].mean() > 1.5 * clicked[lo].mean()
    # Watch time per click, compared between items of similar duration (a tiny catalogue's
    # quartiles differ in duration by chance), and relative to the duration.
    strata = np.digitize(duration, np.quantile(duration[clicked], [0.2, 0.4, 0.6, 0.8]))
    ratios = [
        wt[hi & clicked & (strata == k)].mean() / wt[lo & clicked & (strata == k)].mean()
        for k in range(5)
    ]
    assert np.mean(ratios) < 0.9
    completion = wt / duration
    assert completion[hi & clicked].mean() < 0.9 * completion[lo & clicked].mean()


def test_search_tokens_predict_topics_of_later_watches(tiny: Path) -> None:
    ds = Dataset.open(tiny)
    world = World.load(tiny)
    token_topic = {tok: t for t, words in enumerate(world.vocab) for tok in words}
    s = ds.table("searches")
    votes = np.zeros((world.n_users + 1, len(world.topics)))
    first_search = np.full(world.n_users + 1, np.iinfo(np.int64).max)
    for user, ts, query in zip(
        s["user_id"].to_numpy(), s["ts"].to_numpy(), s["query"].to_pylist(), strict=True
    ):
        first_search[user] = min(first_search[user], ts)
        for tok in query.split():
            if tok in token_topic:
                votes[user, token_topic[tok]] += 1
    w = _watches(tiny)
    # Later watches not made from a search results page.
    later = (w["ts"] > first_search[w["user"]]) & (w["source"] != "search")
    topic = world.topic[w["item"][later] - 1]
    predicted = votes[w["user"][later]].argmax(axis=1)
    accuracy = (predicted == topic).mean()
    assert later.sum() > 1_000
    assert accuracy / _chance(predicted, topic) > 3.0


def test_demographics_carry_information_about_interests(tmp_path: Path) -> None:
    """A nearest-centroid classifier on demographic cells beats the global topic mix.

    Each user is described by the topic distribution of their watches; the prediction
    for a held-out user is the mean distribution of training users of the same age
    band, gender and region (shrunk to the global mean).
    """
    config = preset_config("tiny", ["n_users=3000", "days=7"])
    out = generate(config, SEED, tmp_path / "demo", progress=False).path
    users = Dataset.open(out).table("users")
    w = _watches(out)
    world = World.load(out)
    n_topics = len(world.topics)
    counts = np.zeros((world.n_users, n_topics))
    np.add.at(counts, (w["user"] - 1, world.topic[w["item"] - 1]), 1)
    keep = counts.sum(axis=1) >= 5
    mix = counts[keep] / counts[keep].sum(axis=1, keepdims=True)
    cell = np.digitize(users["age"].fill_null(-1).to_numpy(), [0, 18, 25, 35, 50])
    for col in ("gender", "region"):
        values = np.asarray([str(v) for v in users[col].to_pylist()])
        cell = cell * 16 + np.unique(values, return_inverse=True)[1]
    cell = np.unique(cell[keep], return_inverse=True)[1]
    train = np.arange(len(mix)) < int(0.7 * len(mix))
    overall = (mix[train].sum(axis=0) + 0.5) / (train.sum() + 0.5 * n_topics)
    sums = np.zeros((cell.max() + 1, n_topics))
    np.add.at(sums, cell[train], mix[train])
    n = np.bincount(cell[train], minlength=cell.max() + 1)[:, None]
    predicted = ((sums + 5 * overall) / (n + 5))[cell[~train]]
    test = mix[~train]
    cross_entropy = -(test * np.log(predicted)).sum(axis=1).mean()
    baseline = -(test * np.log(overall)).sum(axis=1).mean()
    guess, truth = predicted.argmax(axis=1), test.argmax(axis=1)
    accuracy = (guess == truth).mean()
    assert len(mix) > 1_000
    assert baseline - cross_entropy > 0.1  # nats per watch
    assert accuracy / _chance(guess, truth) > 1.3


def test_overrides_and_their_errors() -> None:
    c = apply_overrides(
        PRESETS["tiny"], ["days=3", "n_users=1e3", "user_model.click_bias=-2.5", "start=2025-06-01"]
    )
    assert (c.days, c.n_users, c.user_model.click_bias) == (3, 1000, -2.5)
    assert c.window_start == 1748736000
    assert c.users_per_block == c.block_user_days // 3
    with pytest.raises(FunnelrecError, match=r"unknown config key 'dayz'.*days"):
        apply_overrides(c, ["dayz=3"])
    with pytest.raises(FunnelrecError, match=r"unknown config key 'user_model\.nope'"):
        apply_overrides(c, ["user_model.nope=1"])
    with pytest.raises(FunnelrecError, match="key 'days' must be an integer"):
        apply_overrides(c, ["days=three"])
    with pytest.raises(FunnelrecError, match="not of the form key=value"):
        apply_overrides(c, ["days"])
    with pytest.raises(FunnelrecError, match=r"home_share must be in \[0, 1\]"):
        apply_overrides(c, ["home_share=1.5"])
    with pytest.raises(FunnelrecError, match="completion_clickbait"):
        apply_overrides(c, ["user_model.completion_clickbait=0.5"])
    with pytest.raises(FunnelrecError, match="start must be a date"):
        apply_overrides(c, ["start=yesterday"])
    with pytest.raises(FunnelrecError, match="unknown preset 'huge'"):
        preset_config("huge")
    with pytest.raises(FunnelrecError, match="n_users must be >= 1"):
        SimConfig(n_users=0)


def test_every_config_key_is_documented() -> None:
    doc = (Path(__file__).parents[2] / "docs" / "simulator.md").read_text()
    keys = [f.name for f in fields(SimConfig) if f.name != "user_model"]
    keys += [f.name for f in fields(UserModel)]
    assert [k for k in keys if k not in doc] == []


def test_cli_command_writes_a_dataset(tmp_path: Path) -> None:
    app = typer.Typer()
    app.command()(simulate)
    out = tmp_path / "cli"
    args = ["--preset", "tiny", "--seed", "3", "--out", str(out), "--no-progress"]
    result = CliRunner().invoke(app, [*args, "n_users=50", "days=2"])
    assert result.exit_code == 0, result.output
    assert "watches" in result.output
    ds = Dataset.open(out)
    assert ds.num_rows("users") == 50 and ds.manifest.extra["simulator"]["seed"] == 3
    assert World.load(out).meta["config"]["days"] == 2
    # A second run refuses to overwrite without --force, and a bad key is an error.
    again = CliRunner().invoke(app, [*args, "days=2"])
    assert again.exit_code != 0 and "already exists" in str(again.exception)
    bad = CliRunner().invoke(app, [*args, "--force", "dayz=2"])
    assert bad.exit_code != 0 and "unknown config key" in str(bad.exception)
