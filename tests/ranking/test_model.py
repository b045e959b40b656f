"""The ranking network and its watch-time weighted logistic loss."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from funnelrec.errors import ArtifactError, FunnelrecError
from funnelrec.features.batch import RankingBatch
from funnelrec.ranking import metrics as rank_metrics
from funnelrec.ranking.model import (
    TOWER_PRESETS,
    Calibration,
    IdSpace,
    RankingConfig,
    RankingFeatureSpec,
    RankingModel,
    base_log_odds,
    build_ranker,
    fit_calibration,
    load_ranker,
    save_ranker_artifact,
    weighted_logistic_loss,
)


def item_spec(dense: int = 3) -> RankingFeatureSpec:
    cols = ("x", "x^2", "sqrt(x)")[:dense]
    return RankingFeatureSpec(
        id_spaces=(IdSpace("item", 20, 4), IdSpace("channel", 5, 2)),
        categorical=(("item_id", "item"), ("seed_item_id", "item"), ("channel", "channel")),
        bags=(("last_watched", "item"),),
        dense_columns=cols,
        power_columns=tuple(i for i in (1, 2) if i < dense),
    )


def make_batch(
    item: list[int],
    seed: list[int],
    history: list[list[int]],
    *,
    channel: list[int] | None = None,
    dense: torch.Tensor | None = None,
    label: list[float] | None = None,
    watch_time: list[float] | None = None,
) -> RankingBatch:
    b = len(item)
    flat = [i for h in history for i in h]
    offsets = np.cumsum([0] + [len(h) for h in history[:-1]])
    x = torch.rand(b, 1) if dense is None else dense
    return RankingBatch(
        categorical={
            "item_id": torch.tensor(item),
            "seed_item_id": torch.tensor(seed),
            "channel": torch.tensor(channel or [1] * b),
        },
        bags={"last_watched": (torch.tensor(flat, dtype=torch.long), torch.tensor(offsets))},
        dense=torch.cat([x, x**2, x.sqrt()], dim=1) if dense is None else dense,
        label=torch.tensor(label or [0.0] * b),
        watch_time=torch.tensor(watch_time or [0.0] * b),
        user_id=torch.arange(b),
        request_id=torch.zeros(b, dtype=torch.long),
    )


# ---- loss ---------------------------------------------------------------------------------


def test_weighted_loss_hand_computed() -> None:
    z = torch.tensor([0.0, math.log(3), -math.log(3)])
    y = torch.tensor([1.0, 0.0, 1.0])
    t = torch.tensor([10.0, 0.0, 4.0])
    log2 = math.log(2)
    # click T=10 at z=0: 10 log 2; non-click at log 3: -log(1/4) = 2 log 2;
    # click T=4 at -log 3: -4 log(1/4) = 8 log 2.  Mean over 3.
    assert weighted_logistic_loss(z, y, t).item() == pytest.approx(20 * log2 / 3)
    assert weighted_logistic_loss(z, y, t, objective="ctr").item() == pytest.approx(5 * log2 / 3)
    assert weighted_logistic_loss(z, y, t, watch_time_unit=2.0).item() == pytest.approx(
        11 * log2 / 3
    )
    # clicks also as weight-1 negatives: + log 2 (z=0) + -log(3/4) (z=-log 3)
    assert weighted_logistic_loss(z, y, t, clicks_as_negatives=True).item() == pytest.approx(
        (21 * log2 - math.log(0.75)) / 3
    )


def test_model_loss_matches_function_and_numpy_metric() -> None:
    torch.manual_seed(0)
    model = RankingModel(item_spec(), RankingConfig(tower=(8,), watch_time_unit=30.0))
    batch = make_batch(
        [1, 2, 3, 4],
        [5, 5, 0, 6],
        [[1, 2], [], [0], [7, 8, 9]],
        label=[1, 0, 1, 0],
        watch_time=[120.0, 0, 15.0, 0],
    )
    z = model(batch)
    assert z.shape == (4,)
    loss = model.compute_loss(batch)
    expected = weighted_logistic_loss(z, batch.label, batch.watch_time, watch_time_unit=30.0)
    assert loss.item() == pytest.approx(expected.item())
    np_loss = rank_metrics.weighted_logistic_loss(
        z.detach().numpy(), batch.label.numpy(), batch.watch_time.numpy(), watch_time_unit=30.0
    )
    assert loss.item() == pytest.approx(np_loss, rel=1e-5)
    assert torch.allclose(model.expected_watch_time(batch), torch.exp(z) * 30.0)


# ---- exp(logit) estimates expected watch time --------------------------------------------------


def group_world(seed: int = 0) -> tuple[RankingBatch, np.ndarray, np.ndarray, np.ndarray]:
    """4 groups of impressions with known click probability and watch time distribution."""
    rng = np.random.default_rng(seed)
    click_p = np.array([0.05, 0.2, 0.5, 0.8])
    mean_t = np.array([10.0, 50.0, 100.0, 200.0])
    n = 1000
    g = np.repeat(np.arange(4), n)
    clicked = rng.random(4 * n) < click_p[g]
    t = np.where(clicked, rng.exponential(mean_t[g]), 0.0)
    b = len(g)
    batch = RankingBatch(
        categorical={"group": torch.tensor(g + 1)},
        bags={},
        dense=torch.zeros(b, 0),
        label=torch.tensor(clicked, dtype=torch.float32),
        watch_time=torch.tensor(t, dtype=torch.float32),
        user_id=torch.zeros(b, dtype=torch.long),
        request_id=torch.zeros(b, dtype=torch.long),
    )
    return batch, g, clicked, t


def fit_full_batch(model: RankingModel, batch: RankingBatch) -> None:
    """Minimise the loss on the whole batch (L-BFGS: a few dozen steps, deterministic)."""
    opt = torch.optim.LBFGS(
        model.parameters(), max_iter=200, line_search_fn="strong_wolfe", tolerance_grad=1e-9
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = model.compute_loss(batch)
        loss.backward()
        return loss

    opt.step(closure)


@pytest.mark.parametrize(
    ("config", "target"),
    [
        # the paper: odds = sum(T) / (N - k) = E[T] / (1 - P) ~ E[T] (1 + P)
        (RankingConfig(tower=()), "paper"),
        # the unit rescales the weights; expected_watch_time multiplies it back exactly
        (RankingConfig(tower=(), watch_time_unit=60.0), "paper"),
        # clicks also as negatives: odds = sum(T) / N = E[T] exactly
        (RankingConfig(tower=(), clicks_as_negatives=True), "exact"),
        # CTR: odds = k / (N - k)
        (RankingConfig(tower=(), objective="ctr"), "ctr"),
    ],
)
def test_exp_logit_recovers_expected_watch_time(config: RankingConfig, target: str) -> None:
    batch, g, clicked, t = group_world()
    spec = RankingFeatureSpec(
        id_spaces=(IdSpace("group", 5, 2),), categorical=(("group", "group"),)
    )
    torch.manual_seed(0)
    model = RankingModel(spec, config)
    fit_full_batch(model, batch)
    probe = RankingBatch(
        categorical={"group": torch.arange(1, 5)},
        bags={},
        dense=torch.zeros(4, 0),
        label=torch.zeros(4),
        watch_time=torch.zeros(4),
        user_id=torch.zeros(4, dtype=torch.long),
        request_id=torch.zeros(4, dtype=torch.long),
    )
    with torch.no_grad():
        got = model.expected_watch_time(probe).numpy()
    n = np.bincount(g).astype(float)
    k = np.bincount(g, weights=clicked)
    total_t = np.bincount(g, weights=t)
    expected = {
        "paper": total_t / (n - k),
        "exact": total_t / n,
        "ctr": k / (n - k) * config.watch_time_unit,
    }[target]
    np.testing.assert_allclose(got, expected, rtol=0.02)
    if target == "paper":
        # and the paper's approximation E[T](1 + P) is close for the low-P group
        assert got[0] == pytest.approx(total_t[0] / n[0] * (1 + k[0] / n[0]), rel=0.02)


# ---- shared tables, separate inputs --------------------------------------------------------


def test_one_table_per_id_space_shared_by_features() -> None:
    model = RankingModel(item_spec(), RankingConfig(tower=(8,)))
    item_rows = [p for p in model.parameters() if p.shape == (20, 4)]
    assert len(item_rows) == 1  # item_id, seed_item_id and last_watched read ONE tensor
    table = model.embeddings["item"].weight
    assert item_rows[0] is table

    # gradients from every feature of the space land in that one tensor
    batch = make_batch([1], [2], [[3, 4]])
    model(batch).sum().backward()
    assert table.grad is not None
    touched = set(torch.nonzero(table.grad.abs().sum(dim=1)).ravel().tolist())
    assert touched == {1, 2, 3, 4}


def test_features_are_separate_slices_of_the_first_layer() -> None:
    torch.manual_seed(0)
    model = RankingModel(item_spec(), RankingConfig(tower=(8,)))
    first = model.tower[0]
    assert isinstance(first, torch.nn.Linear)
    assert first.in_features == 4 + 4 + 2 + 4 + 3  # item, seed, channel, bag, dense
    batch = make_batch([1], [2], [[3, 4]])
    x = model.features(batch)
    table = model.embeddings["item"].weight.detach()
    sl = model.input_slices
    assert torch.allclose(x[0, slice(*sl["item_id"])], table[1])
    assert torch.allclose(x[0, slice(*sl["seed_item_id"])], table[2])
    assert torch.allclose(x[0, slice(*sl["last_watched"])], (table[3] + table[4]) / 2)
    # swapping the shown item and the seed item changes the score: not pooled together
    swapped = make_batch([2], [1], [[3, 4]], dense=batch.dense)
    assert not torch.allclose(model(batch), model(swapped))


def test_oov_and_padding_embed_to_zero() -> None:
    model = RankingModel(item_spec(), RankingConfig(tower=()))
    table = model.embeddings["item"].weight.detach()
    batch = make_batch([0, 5, 5, 5], [0, 0, 0, 0], [[], [0, 0], [3, 0], [3]])
    x = model.features(batch)
    sl = model.input_slices
    assert torch.all(x[0, slice(*sl["item_id"])] == 0)  # OOV id 0
    assert torch.all(x[:, slice(*sl["seed_item_id"])] == 0)
    bag = x[:, slice(*sl["last_watched"])]
    assert torch.all(bag[0] == 0)  # empty bag
    assert torch.all(bag[1] == 0)  # all OOV
    assert torch.allclose(bag[2], table[3])  # OOV left out of the mean
    assert torch.allclose(bag[3], table[3])
    # row 0 stays zero through training (no gradient reaches it)
    model.compute_loss(make_batch([0], [0], [[0]], label=[1.0], watch_time=[9.0])).backward()
    assert torch.all(model.embeddings["item"].weight.grad[0] == 0)


def test_power_features_ablation_drops_columns() -> None:
    spec = item_spec()
    with_p = RankingModel(spec, RankingConfig(tower=(8,)))
    without = RankingModel(spec, RankingConfig(tower=(8,), power_features=False))
    assert with_p.input_width - without.input_width == 2
    batch = make_batch([1, 2], [3, 4], [[5], [6]])
    dense = without.features(batch)[:, slice(*without.input_slices["dense"])]
    assert torch.equal(dense, batch.dense[:, :1])


def test_tower_presets_and_config_errors() -> None:
    assert RankingConfig(tower="1024-512-256").tower == (1024, 512, 256)  # type: ignore[arg-type]
    assert RankingConfig(tower="none").tower == ()  # type: ignore[arg-type]
    for name, widths in TOWER_PRESETS.items():
        model = RankingModel(item_spec(), RankingConfig(tower=widths))
        linears = [m for m in model.tower if isinstance(m, torch.nn.Linear)]
        assert [m.out_features for m in linears] == [*widths, 1], name
    with pytest.raises(FunnelrecError, match="unknown tower"):
        RankingConfig(tower="2048")  # type: ignore[arg-type]
    with pytest.raises(FunnelrecError, match="objective"):
        RankingConfig(objective="clicks")  # type: ignore[arg-type]
    with pytest.raises(FunnelrecError, match="unknown key"):
        RankingConfig.from_dict({"towers": [1]})
    with pytest.raises(FunnelrecError, match="unknown id space"):
        RankingFeatureSpec(id_spaces=(IdSpace("item", 3, 2),), categorical=(("x", "user"),))


def test_missing_feature_and_wrong_dense_width_are_clear_errors() -> None:
    model = RankingModel(item_spec(), RankingConfig(tower=()))
    batch = make_batch([1], [2], [[3]])
    no_seed = RankingBatch(
        categorical={k: v for k, v in batch.categorical.items() if k != "seed_item_id"},
        bags=batch.bags,
        dense=batch.dense,
        label=batch.label,
        watch_time=batch.watch_time,
        user_id=batch.user_id,
        request_id=batch.request_id,
    )
    with pytest.raises(FunnelrecError, match="seed_item_id"):
        model(no_seed)
    with pytest.raises(FunnelrecError, match="dense columns"):
        model(make_batch([1], [2], [[3]], dense=torch.zeros(1, 5)))


def test_metadata_round_trip_rebuilds_the_same_network() -> None:
    torch.manual_seed(0)
    model = RankingModel(item_spec(), RankingConfig(tower=(16, 8), objective="ctr"))
    clone = build_ranker(model.metadata())
    clone.load_state_dict(model.state_dict())
    batch = make_batch([1, 2], [3, 4], [[5], [6, 7]])
    assert torch.equal(model(batch), clone(batch))
    assert clone.config == model.config and clone.spec == model.spec


# ---- a trained ranker beats random order ---------------------------------------------------


def page_world(seed: int, pages: int) -> RankingBatch:
    """Pages of 8 impressions. Clicks rise with affinity and clickbait; watch time with
    affinity and quality only. Features: item id, channel (= topic), the user's last watches,
    and a noisy dense affinity signal (x, x^2, sqrt(x))."""
    rng = np.random.default_rng(seed)
    n_items, n_topics, per_page = 19, 4, 8
    topic = np.arange(n_items) % n_topics
    world = np.random.default_rng(123)  # the same items in every split
    quality = world.normal(0, 1, n_items)
    clickbait = world.normal(0, 1, n_items)
    user_topic = rng.integers(0, n_topics, pages)
    items = np.stack([rng.choice(n_items, per_page, replace=False) for _ in range(pages)])
    aff = (topic[items] == user_topic[:, None]).astype(float)
    p_click = 1 / (1 + np.exp(-(-1.5 + 1.5 * aff + 2.0 * clickbait[items])))
    clicked = rng.random(items.shape) < p_click
    completion = 1 / (1 + np.exp(-(aff + 3.0 * quality[items] - 0.5)))
    t = np.where(clicked, 300 * completion * rng.uniform(0.8, 1.2, items.shape), 0.0)
    x = np.clip(0.6 * aff + 0.4 * rng.random(items.shape), 0, 1).ravel()
    # history: 3 items of the user's topic
    hist = np.stack([rng.choice(np.flatnonzero(topic == u), 3) for u in user_topic])
    b = items.size
    return RankingBatch(
        categorical={
            "item_id": torch.tensor(items.ravel() + 1),
            "seed_item_id": torch.tensor(np.repeat(hist[:, 0], per_page) + 1),
            "channel": torch.tensor(topic[items].ravel() + 1),
        },
        bags={
            "last_watched": (
                torch.tensor(np.repeat(hist, per_page, axis=0).ravel() + 1),
                torch.arange(0, 3 * b, 3),
            )
        },
        dense=torch.tensor(np.stack([x, x**2, np.sqrt(x)], 1), dtype=torch.float32),
        label=torch.tensor(clicked.ravel(), dtype=torch.float32),
        watch_time=torch.tensor(t.ravel(), dtype=torch.float32),
        user_id=torch.tensor(np.repeat(np.arange(pages), per_page)),
        request_id=torch.tensor(np.repeat(np.arange(pages), per_page)),
    )


def train_minibatch(model: RankingModel, data: RankingBatch, epochs: int, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    n, bs = len(data), 256
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen)
        for start in range(0, n, bs):
            idx = perm[start : start + bs]
            hist_ids, _ = data.bags["last_watched"]
            sub = RankingBatch(
                categorical={k: v[idx] for k, v in data.categorical.items()},
                bags={
                    "last_watched": (
                        hist_ids.view(-1, 3)[idx].ravel(),
                        torch.arange(0, 3 * len(idx), 3),
                    )
                },
                dense=data.dense[idx],
                label=data.label[idx],
                watch_time=data.watch_time[idx],
                user_id=data.user_id[idx],
                request_id=data.request_id[idx],
            )
            opt.zero_grad()
            model.compute_loss(sub).backward()
            opt.step()


def holdout_loss(model: RankingModel, test: RankingBatch) -> float:
    with torch.no_grad():
        z = model(test).numpy()
    return rank_metrics.weighted_per_user_loss(
        z,
        test.label.numpy(),
        test.watch_time.numpy(),
        test.user_id.numpy(),
        test.request_id.numpy(),
    )


def test_trained_ranker_beats_random_order_and_ctr() -> None:
    train, test = page_world(1, 1000), page_world(2, 400)
    spec = RankingFeatureSpec(
        id_spaces=(IdSpace("item", 20, 4), IdSpace("channel", 5, 2)),
        categorical=(("item_id", "item"), ("seed_item_id", "item"), ("channel", "channel")),
        bags=(("last_watched", "item"),),
        dense_columns=("x", "x^2", "sqrt(x)"),
        power_columns=(1, 2),
    )
    losses = {}
    for objective in ("watch_time", "ctr"):
        torch.manual_seed(0)
        config = RankingConfig(tower=(32,), objective=objective)  # type: ignore[arg-type]
        model = RankingModel(spec, config)
        model.set_output_bias(base_log_odds(train.label, train.watch_time, config))
        train_minibatch(model, train, epochs=2)
        losses[objective] = holdout_loss(model, test)
    rng = np.random.default_rng(0)
    random_loss = np.mean(
        [
            rank_metrics.weighted_per_user_loss(
                rng.random(len(test)),
                test.label.numpy(),
                test.watch_time.numpy(),
                test.user_id.numpy(),
                test.request_id.numpy(),
            )
            for _ in range(5)
        ]
    )
    assert 0.45 < random_loss < 0.55
    assert losses["watch_time"] < random_loss - 0.1
    # CTR ranks clickbait up; watch-time weighting does not
    assert losses["watch_time"] < losses["ctr"] - 0.02


def test_base_log_odds_is_the_best_constant() -> None:
    label = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0])
    t = torch.tensor([30.0, 0.0, 0.0, 90.0, 0.0])
    assert base_log_odds(label, t, RankingConfig()) == pytest.approx(math.log(120 / 3))
    assert base_log_odds(label, t, RankingConfig(objective="ctr")) == pytest.approx(math.log(2 / 3))
    exact = RankingConfig(clicks_as_negatives=True, watch_time_unit=60.0)
    assert base_log_odds(label, t, exact) == pytest.approx(math.log(2 / 5))


def test_sparse_tables_train_with_the_shared_loop() -> None:
    from funnelrec.training.loop import TrainConfig, loader_epochs, train

    torch.manual_seed(0)
    model = RankingModel(item_spec(), RankingConfig(tower=(8,), sparse=True))
    assert {id(p) for p in model.sparse_parameters()} == {
        id(model.embeddings["item"].weight),
        id(model.embeddings["channel"].weight),
    }
    batch = make_batch(
        [1, 2, 3, 0], [5, 0, 6, 7], [[1, 2], [], [0, 4], [9]],
        label=[1, 0, 1, 0], watch_time=[120.0, 0, 15.0, 0],
    )  # fmt: skip
    before = model.embeddings["item"].weight.detach().clone()
    result = train(
        model, loader_epochs([batch] * 5), TrainConfig(grad_clip=0.0, lr=0.01), progress=False
    )
    after = model.embeddings["item"].weight.detach()
    assert result.steps == 5
    assert torch.all(after[0] == 0)  # padding / OOV row untouched
    assert not torch.equal(before[1], after[1])  # used rows moved
    assert torch.equal(before[10:], after[10:])  # unused rows did not (SparseAdam)


# ---- calibration -----------------------------------------------------------------------------


def test_fit_calibration_recovers_a_known_factor_and_matches_the_mean() -> None:
    rng = np.random.default_rng(0)
    z = rng.normal(2.0, 1.0, 20_000)
    t = rng.exponential(3.0 * np.exp(z))  # E[T | z] = 3 exp(z): the true factor is 3
    cal = fit_calibration(z, t)
    assert cal.factor == pytest.approx(3.0, rel=0.05)
    assert cal.fitted_on == "valid" and cal.impressions == len(z)
    assert cal.factor * np.exp(z).mean() == pytest.approx(t.mean(), rel=1e-9)
    assert cal.mean_raw == pytest.approx(np.exp(z).mean()) and cal.mean_observed == t.mean()
    # the unit is part of the raw estimate: c * exp(z) * unit still matches the mean
    in_minutes = fit_calibration(z, t, watch_time_unit=60.0)
    assert in_minutes.factor * 60.0 == pytest.approx(cal.factor)
    # logits far beyond exp's range do not overflow (computed in log space)
    big = fit_calibration(z + 600.0, t)
    assert math.log(big.factor) == pytest.approx(math.log(cal.factor) - 600)
    with pytest.raises(FunnelrecError, match="float64"):
        fit_calibration(z + 1000.0, t)


def test_fit_calibration_without_data_keeps_factor_one_and_says_why() -> None:
    assert fit_calibration([], []).factor == 1.0
    assert "no impressions" in fit_calibration([], []).note
    none = fit_calibration([0.5, 1.0], [0.0, 0.0])
    assert none.factor == 1.0 and none.fitted_on is None and "no watch time" in none.note
    with pytest.raises(FunnelrecError, match="logits"):
        fit_calibration([1.0], [1.0, 2.0])
    with pytest.raises(FunnelrecError, match="factor"):
        Calibration(factor=0.0)


def test_calibrated_model_matches_known_mean_watch_time_and_keeps_the_order() -> None:
    """Groups of known click rate and watch time: the paper's loss overshoots the mean watch
    time per impression by 1 / (1 - P) per group; one factor fitted on a holdout brings the
    mean back, on a third sample, without changing any order."""
    spec = RankingFeatureSpec(
        id_spaces=(IdSpace("group", 5, 2),), categorical=(("group", "group"),)
    )
    torch.manual_seed(0)
    model = RankingModel(spec, RankingConfig(tower=()))
    fit_full_batch(model, group_world(0)[0])
    holdout, fresh = group_world(1)[0], group_world(2)[0]
    with torch.no_grad():
        z_holdout = model(holdout).double().numpy()
        z_fresh = model(fresh).double().numpy()
        raw = model.expected_watch_time(fresh).double().numpy()
    # truth: mean over groups of P * E[T | click] = (0.5 + 10 + 50 + 160) / 4
    true_mean = (0.05 * 10 + 0.2 * 50 + 0.5 * 100 + 0.8 * 200) / 4
    assert raw.mean() > 1.5 * true_mean  # uncalibrated: far too high (P up to 0.8)
    model.calibration = fit_calibration(z_holdout, holdout.watch_time.numpy())
    with torch.no_grad():
        calibrated = model.expected_watch_time(fresh).double().numpy()
    assert calibrated.mean() == pytest.approx(true_mean, rel=0.05)
    np.testing.assert_allclose(model.seconds_from_logits(z_fresh), calibrated, rtol=1e-6)
    np.testing.assert_allclose(model.seconds_from_logits(z_fresh, calibrated=False), raw, rtol=1e-6)
    # order preserved: same sort, same ranking metrics
    rng = np.random.default_rng(0)
    z = rng.normal(0, 2, 500)
    seconds = model.seconds_from_logits(z)
    assert np.array_equal(np.argsort(z, kind="stable"), np.argsort(seconds, kind="stable"))
    label = (rng.random(500) < 0.3).astype(np.float32)
    t = label * rng.exponential(60, 500)
    page = np.arange(500) // 10
    assert rank_metrics.auc(seconds, label) == rank_metrics.auc(z, label)
    assert rank_metrics.weighted_per_user_loss(
        seconds, label, t, page, page
    ) == rank_metrics.weighted_per_user_loss(z, label, t, page, page)


def test_calibration_travels_with_the_artifact(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = RankingModel(item_spec(), RankingConfig(tower=(8,)))
    model.calibration = Calibration(
        factor=0.8, fitted_on="valid", impressions=10, mean_raw=50.0, mean_observed=40.0
    )
    save_ranker_artifact(model, tmp_path, meta={})
    meta = json.loads((tmp_path / "config.json").read_text())
    assert meta["format_version"] == 2 and meta["calibration"]["factor"] == 0.8
    again = load_ranker(tmp_path)
    assert again.calibration == model.calibration
    batch = make_batch([1, 2], [3, 4], [[5], [6, 7]])
    with torch.no_grad():
        assert torch.allclose(
            again.expected_watch_time(batch),
            0.8 * again.expected_watch_time(batch, calibrated=False),
        )


def test_format_1_artifact_loads_uncalibrated_and_says_so(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = RankingModel(item_spec(), RankingConfig(tower=(8,)))
    save_ranker_artifact(model, tmp_path, meta={})
    meta = json.loads((tmp_path / "config.json").read_text())
    del meta["calibration"]
    meta["format_version"] = 1  # as written before calibration existed
    (tmp_path / "config.json").write_text(json.dumps(meta))
    with pytest.warns(UserWarning, match=r"format 1 artifact.*factor 1"):
        old = load_ranker(tmp_path)
    assert old.calibration.factor == 1.0 and "format 1" in old.calibration.note
    batch = make_batch([1, 2], [3, 4], [[5], [6, 7]])
    with torch.no_grad():
        assert torch.equal(old.expected_watch_time(batch), torch.exp(old(batch)))
    # a version-2 file must carry its calibration; other versions are refused
    meta["format_version"] = 2
    with pytest.raises(ArtifactError, match="without calibration"):
        build_ranker(meta)
    meta["format_version"] = 3
    (tmp_path / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match="format version 3"):
        load_ranker(tmp_path)
