"""Ranking metrics against hand-computed values and brute-force references."""

from __future__ import annotations

import math

import numpy as np
import pytest

from funnelrec.ranking import metrics as rm


def page_fixture() -> dict[str, np.ndarray]:
    # page (u1, r1): A+ T=10 s=.9 | B- s=.5 | C- s=.95 | D+ T=20 s=.5 (ties with B)
    # page (u1, r2): E+ T=5 s=.1 | F- s=.2
    # page (u2, r1): same request id as u1's first page, different user: G+ T=30 s=0 | H- s=1
    # page (u2, r3): I+ T=100 alone (no pairs)
    return {
        "score": np.array([0.9, 0.5, 0.95, 0.5, 0.1, 0.2, 0.0, 1.0, 0.3]),
        "label": np.array([1, 0, 0, 1, 1, 0, 1, 0, 1]),
        "watch_time": np.array([10.0, 0, 0, 20, 5, 0, 30, 0, 100]),
        "user_id": np.array([1, 1, 1, 1, 1, 1, 2, 2, 2]),
        "request_id": np.array([1, 1, 1, 1, 2, 2, 1, 1, 3]),
    }


def test_weighted_per_user_loss_hand_computed() -> None:
    f = page_fixture()
    # pairs: (A,B) ok; (A,C) wrong 10; (D,B) tie 0.5*20; (D,C) wrong 20;
    #        (E,F) wrong 5; (G,H) wrong 30.  total = 10+10+20+20+5+30 = 95, wrong = 75.
    got = rm.weighted_per_user_loss(**f)
    assert got == pytest.approx(75 / 95)


def test_pair_counts_hand_computed() -> None:
    f = page_fixture()
    c = rm.pair_counts(f["score"], f["label"], f["user_id"], f["request_id"])
    assert c.negatives.tolist() == [2, 0, 0, 2, 1, 0, 1, 0, 0]
    assert c.higher.tolist() == [1, 0, 0, 1, 1, 0, 1, 0, 0]
    assert c.ties.tolist() == [0, 0, 0, 1, 0, 0, 0, 0, 0]


def test_weighted_per_user_loss_extremes() -> None:
    f = page_fixture()
    perfect = f["label"] * 10.0  # every click above every non-click
    assert rm.weighted_per_user_loss(perfect, *[f[k] for k in list(f)[1:]]) == 0.0
    assert rm.weighted_per_user_loss(-perfect, *[f[k] for k in list(f)[1:]]) == 1.0
    constant = np.zeros(9)  # all ties: exactly half
    assert rm.weighted_per_user_loss(constant, *[f[k] for k in list(f)[1:]]) == 0.5


def test_weighted_per_user_loss_matches_brute_force() -> None:
    rng = np.random.default_rng(0)
    n = 400
    score = rng.integers(0, 6, n).astype(float)  # many ties on purpose
    label = rng.random(n) < 0.3
    t = np.where(label, rng.exponential(60, n), 0.0)
    user = rng.integers(0, 7, n)
    req = rng.integers(0, 5, n)
    wrong = total = 0.0
    for i in np.flatnonzero(label):
        for j in np.flatnonzero(~label):
            if user[i] == user[j] and req[i] == req[j]:
                total += t[i]
                wrong += t[i] * (1.0 if score[j] > score[i] else 0.5 if score[j] == score[i] else 0)
    assert rm.weighted_per_user_loss(score, label, t, user, req) == pytest.approx(wrong / total)


def test_weighted_per_user_loss_nan_without_pairs() -> None:
    assert math.isnan(rm.weighted_per_user_loss([1.0], [1], [5.0], [1], [1]))


def test_auc_hand_computed() -> None:
    assert rm.auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    # pos {0.5, 0.9} vs neg {0.5, 0.2}: 0.5 (tie) + 1 + 1 + 1 = 3.5 of 4
    assert rm.auc([0.5, 0.5, 0.2, 0.9], [1, 0, 0, 1]) == pytest.approx(0.875)
    assert math.isnan(rm.auc([0.1, 0.2], [1, 1]))


def test_auc_matches_brute_force() -> None:
    rng = np.random.default_rng(1)
    s = rng.integers(0, 10, 300).astype(float)
    y = rng.random(300) < 0.4
    p, q = s[y][:, None], s[~y][None, :]
    expected = float(np.mean((p > q) + 0.5 * (p == q)))
    assert rm.auc(s, y) == pytest.approx(expected)


def test_gauc_hand_computed() -> None:
    score = [0.1, 0.4, 0.35, 0.8, 0.1, 0.3, 0.5, 0.6]
    label = [0, 0, 1, 1, 1, 0, 1, 1]
    user = [7, 7, 7, 7, 3, 3, 9, 9]
    # user 7: AUC 0.75 over 4 impressions; user 3: AUC 0 over 2; user 9: only clicks, left out
    assert rm.gauc(score, label, user) == pytest.approx((0.75 * 4 + 0 * 2) / 6)


def test_log_losses_hand_computed() -> None:
    z = np.array([0.0, math.log(3)])
    y = np.array([1, 0])
    # -log sigmoid(0) = log 2; -log(1 - sigmoid(log 3)) = -log(1/4) = log 4
    assert rm.log_loss(z, y) == pytest.approx(1.5 * math.log(2))
    # click of T=10 at z=0 weighs 10: (10 log 2 + log 4) / 2
    assert rm.weighted_logistic_loss(z, y, [10.0, 0.0]) == pytest.approx(6 * math.log(2))
    assert rm.weighted_logistic_loss(z, y, [10.0, 0.0], watch_time_unit=2.0) == pytest.approx(
        3.5 * math.log(2)
    )
    # the click also counts as a weight-1 negative: + log 2
    assert rm.weighted_logistic_loss(z, y, [10.0, 0.0], clicks_as_negatives=True) == pytest.approx(
        6.5 * math.log(2)
    )


def test_calibration_hand_computed() -> None:
    c = rm.calibration([1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 4.0, 6.0], bins=2)
    assert c["mean_predicted"] == pytest.approx(2.5)
    assert c["mean_observed"] == pytest.approx(2.5)
    assert c["ratio"] == pytest.approx(1.0)
    low, high = c["deciles"]
    assert low["count"] == 2 and low["mean_predicted"] == 1.5 and math.isnan(low["ratio"])
    assert high["mean_predicted"] == 3.5 and high["mean_observed"] == 5.0
    assert high["ratio"] == pytest.approx(0.7)


def test_ranking_metrics_bundle_is_consistent() -> None:
    f = page_fixture()
    m = rm.ranking_metrics(**f)
    assert m["weighted_per_user_loss"] == pytest.approx(75 / 95)
    assert m["auc"] == pytest.approx(rm.auc(f["score"], f["label"]))
    assert m["impressions"] == 9 and m["clicks"] == 5 and m["pages"] == 4 and m["pairs"] == 6
    assert len(m["calibration"]["deciles"]) == 9  # 9 impressions: one per bin, empty bin dropped
    assert m["calibration"]["mean_predicted"] == pytest.approx(np.exp(f["score"]).mean())
    assert m["calibration"]["factor"] == 1.0
    assert [d["mean_predicted"] for d in m["calibration_raw"]["deciles"]] == [
        d["mean_predicted"] for d in m["calibration"]["deciles"]
    ]
    # a calibration factor scales the predictions, never the order metrics
    c = rm.ranking_metrics(**f, calibration_factor=0.5)
    assert c["calibration"]["ratio"] == pytest.approx(0.5 * m["calibration"]["ratio"])
    assert c["calibration_raw"]["mean_predicted"] == m["calibration_raw"]["mean_predicted"]
    assert c["weighted_per_user_loss"] == m["weighted_per_user_loss"] and c["auc"] == m["auc"]


def test_top_k_share_hand_computed() -> None:
    score = [0.9, 0.1, 0.5, 0.7, 0.2, 0.3]
    user = [1, 1, 1, 2, 2, 2]
    flag = [1, 0, 0, 0, 1, 1]
    # user 1 top 2: 0.9 (flag), 0.5 -> 1 of 2; user 2 top 2: 0.7, 0.3 (flag) -> 1 of 2
    assert rm.top_k_share(score, user, flag, k=2) == pytest.approx(0.5)
    assert rm.top_k_share(score, user, flag, k=1) == pytest.approx(0.5)  # 0.9 yes, 0.7 no
    assert rm.top_k_share(score, user, flag, k=10) == pytest.approx(0.5)  # everything
