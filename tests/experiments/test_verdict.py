"""The paired intervals over seeds and units, and the verdict rule, on constructed inputs."""

from __future__ import annotations

import numpy as np
import pytest

from funnelrec.errors import FunnelrecError
from funnelrec.experiments.evaluation import (
    Interval,
    bootstrap_ci,
    mean_interval,
    paired_interval,
)
from funnelrec.experiments.verdict import Check, decide, overall, verdict


def _check(iv: Interval, expect: str = ">") -> Check:
    return Check("a beats b", "a - b", expect, iv, "recall@100")  # type: ignore[arg-type]


def test_a_clear_shift_holds_in_its_direction_and_not_in_the_other() -> None:
    rng = np.random.default_rng(0)
    b = rng.random((3, 2000))
    a = b + 0.05 + rng.normal(0, 0.01, b.shape)  # every unit, every seed: a little better
    iv = paired_interval(a, b)
    assert iv.lo > 0 and iv.mean == pytest.approx(0.05, abs=0.002)
    assert (iv.seeds, iv.units) == (3, 2000)
    assert decide(iv, ">") == "yes" and _check(iv).holds == "yes"
    assert decide(iv, "<") == "no" and _check(iv, "<").holds == "no"
    worse = paired_interval(b, a)
    assert worse.hi < 0 and decide(worse, ">") == "no" and decide(worse, "<") == "yes"


def test_no_difference_is_unclear_and_says_what_could_be_resolved() -> None:
    rng = np.random.default_rng(1)
    a = rng.integers(0, 2, (3, 500)).astype(float)  # two arms of the same quality
    b = rng.integers(0, 2, (3, 500)).astype(float)
    iv = paired_interval(a, b)
    assert iv.lo < 0 < iv.hi
    check = _check(iv)
    assert check.holds == "unclear"
    sentence = check.sentence()
    assert "unclear" in sentence and "includes 0" in sentence
    assert f"half-width {iv.half_width:.4f}" in sentence and "3 seed(s) x 500 units" in sentence


def test_pairing_removes_what_both_arms_share() -> None:
    # units differ a lot (some easy, some hard), the arms by a small constant: unpaired
    # intervals of each arm overlap, the paired difference is clear
    rng = np.random.default_rng(2)
    unit = rng.random(1000) * 10
    a, b = unit + 0.05, unit.copy()
    lo_a, _ = bootstrap_ci(a)
    _, hi_b = bootstrap_ci(b)
    assert lo_a < hi_b  # overlapping intervals of the two means
    iv = paired_interval(a, b)
    assert iv.lo == pytest.approx(0.05) and iv.hi == pytest.approx(0.05)


def test_the_spread_over_seeds_counts() -> None:
    # every seed's difference is exact over units, but the seeds disagree in sign
    b = np.zeros((3, 400))
    a = np.array([[0.1], [0.1], [-0.1]]) * np.ones((3, 400))
    iv = paired_interval(a, b)
    assert iv.mean == pytest.approx(0.1 / 3)
    assert iv.lo < 0 < iv.hi and decide(iv, ">") == "unclear"
    # the same differences as one seed: nothing to resample over seeds, a clear effect
    one = paired_interval(a[:1], b[:1])
    assert one.lo == pytest.approx(0.1) and one.seeds == 1


def test_ratios_of_sums_per_seed() -> None:
    # per user: mispredicted and total watch time; the loss is sum / sum, not a mean of
    # per-user ratios
    wrong_a = np.array([[1.0, 9.0], [2.0, 8.0]])
    total_a = np.array([[10.0, 10.0], [10.0, 10.0]])
    wrong_b = np.array([[5.0, 0.0], [5.0, 0.0]])
    total_b = np.array([[10.0, 90.0], [10.0, 90.0]])
    iv = paired_interval(wrong_a, wrong_b, den_a=total_a, den_b=total_b)
    assert iv.mean == pytest.approx(0.5 - 0.05)
    with pytest.raises(FunnelrecError, match="differ in shape"):
        paired_interval(wrong_a, wrong_b[:, :1])


def test_mean_interval_and_determinism() -> None:
    rng = np.random.default_rng(3)
    v = rng.random((2, 300))
    iv = mean_interval(v)
    assert iv.lo < v.mean() < iv.hi
    assert iv.mean == pytest.approx(v.mean())
    assert mean_interval(v) == iv  # seeded: the same interval every time
    assert paired_interval(v[0], v[1]).seeds == 1  # 1-D: one seed


def test_an_experiments_verdict_from_its_checks() -> None:
    yes = Interval(0.1, 0.05, 0.15, 3, 100)
    no = Interval(-0.1, -0.15, -0.05, 3, 100)
    unclear = Interval(0.01, -0.02, 0.04, 3, 100)
    assert overall([_check(yes), _check(yes)]) == "yes"
    assert overall([_check(no), _check(no)]) == "no"
    assert overall([_check(yes), _check(no)]) == "partly"
    assert overall([_check(yes), _check(unclear)]) == "partly"
    assert overall([_check(no), _check(unclear)]) == "no"
    assert overall([_check(unclear)]) == "unclear"
    v = verdict([_check(yes), _check(unclear)], "Intro.")
    assert v["holds"] == "partly" and not v["decided"]
    assert [c["holds"] for c in v["checks"]] == ["yes", "unclear"]
    assert v["text"].startswith("Intro. (1) a beats b: holds")
    assert verdict([_check(yes), _check(no)], "")["decided"]
