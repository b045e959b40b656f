"""Quantile normaliser: near-uniform on training data, monotone, clamps, ties, missing values."""

from __future__ import annotations

import json

import numpy as np
import pytest

from funnelrec.errors import ArtifactError, FunnelrecError
from funnelrec.features.normalize import QuantileNormalizer


def _ks_uniform(x: np.ndarray) -> float:
    """Kolmogorov-Smirnov statistic of x against U(0, 1)."""
    x = np.sort(x)
    n = x.size
    ecdf_hi = np.arange(1, n + 1) / n
    ecdf_lo = np.arange(n) / n
    return float(max(np.max(ecdf_hi - x), np.max(x - ecdf_lo)))


def test_training_output_is_close_to_uniform() -> None:
    rng = np.random.default_rng(0)
    v = rng.lognormal(3.0, 2.0, size=50_000)  # heavily skewed
    qn = QuantileNormalizer.fit({"v": v}, n_quantiles=1000)
    x = qn.transform({"v": v})[:, 0]
    assert _ks_uniform(x) < 0.01
    assert _ks_uniform(v / v.max()) > 0.5  # the raw values are far from uniform
    # Fresh values from the same distribution are also close to uniform.
    assert _ks_uniform(qn.transform({"v": rng.lognormal(3.0, 2.0, size=20_000)})[:, 0]) < 0.02


def test_monotone_in_range_and_clamped_outside() -> None:
    rng = np.random.default_rng(1)
    v = rng.normal(size=5_000)
    qn = QuantileNormalizer.fit({"v": v}, n_quantiles=100)
    grid = np.linspace(-100, 100, 20_001)
    x = qn.transform({"v": grid})[:, 0]
    assert np.all(np.diff(x) >= 0)
    assert x.min() == 0.0 and x.max() < 1.0
    assert qn.column("v")(np.array([v.min() - 1e9]))[0] == 0.0  # below the training range
    top = qn.column("v")(np.array([v.max()]))[0]
    assert top == pytest.approx(100 / 101)
    assert qn.column("v")(np.array([v.max() + 1e9]))[0] == top  # above: clamps


def test_powers_names_and_missing_indicator() -> None:
    v = np.array([1.0, 2.0, np.nan, 4.0, 8.0])
    qn = QuantileNormalizer.fit({"a": v, "b": np.arange(5.0), "c": np.arange(5.0)}, nullable=("c",))
    assert qn.output_columns == [
        "a", "a^2", "sqrt(a)", "a_missing",
        "b", "b^2", "sqrt(b)",
        "c", "c^2", "sqrt(c)", "c_missing",
    ]  # fmt: skip
    assert qn.power_columns == [1, 2, 5, 6, 8, 9]
    out = qn.transform({"a": v, "b": np.arange(5.0), "c": np.array([0, 1, np.nan, 3, 4.0])})
    x = out[:, 0]
    np.testing.assert_allclose(out[:, 1], x**2, rtol=1e-6)
    np.testing.assert_allclose(out[:, 2], np.sqrt(x), rtol=1e-6)
    assert out[:, 3].tolist() == [0, 0, 1, 0, 0]
    assert out[2, 0] == 0.0  # missing -> 0 (with its flag)
    assert out[:, 10].tolist() == [0, 0, 1, 0, 0]
    assert out.dtype == np.float32 and out.shape == (5, 11)
    no_powers = QuantileNormalizer.fit({"a": v}, powers=False)
    assert no_powers.output_columns == ["a", "a_missing"] and no_powers.power_columns == []


def test_constant_and_all_missing_columns() -> None:
    qn = QuantileNormalizer.fit({"k": np.full(100, 7.0), "m": np.full(10, np.nan)})
    k = qn.transform({"k": np.array([-5.0, 7.0, 100.0]), "m": np.array([1.0, np.nan, 2.0])})
    assert np.all(np.isfinite(k))
    assert len(set(k[:, 0].tolist())) == 1  # a constant column carries no signal
    assert k[:, 3].tolist() == [0.0, 0.0, 0.0]  # m: no training values -> 0
    assert k[:, 6].tolist() == [0.0, 1.0, 0.0]  # m's missing flag


def test_heavy_ties_stay_monotone_and_share_one_level() -> None:
    rng = np.random.default_rng(2)
    v = np.concatenate([np.zeros(7_000), rng.exponential(10, size=3_000)])
    qn = QuantileNormalizer.fit({"v": v})
    x = qn.transform({"v": v})[:, 0]
    zeros = x[v == 0]
    assert np.all(zeros == zeros[0])
    assert zeros[0] == pytest.approx(0.35, abs=0.01)  # the middle of the 70% band
    assert np.all(x[v > 0] >= zeros[0])
    grid = np.linspace(-1, 100, 5_000)
    assert np.all(np.diff(qn.transform({"v": grid})[:, 0]) >= 0)
    # Above the tie the values spread over the rest of [0, 1) close to uniformly.
    rest = (x[v > 0] - 0.7) / 0.3
    assert _ks_uniform(np.clip(rest, 0, 1)) < 0.05


def test_save_load_round_trip_and_versions(tmp_path) -> None:
    rng = np.random.default_rng(3)
    qn = QuantileNormalizer.fit(
        {"a": rng.gamma(2.0, size=3000), "b": np.where(rng.random(3000) < 0.1, np.nan, 1.0)},
        n_quantiles=50,
    )
    qn.save(tmp_path / "n.json")
    back = QuantileNormalizer.load(tmp_path / "n.json")
    probe = {"a": rng.gamma(2.0, size=100), "b": np.full(100, np.nan)}
    np.testing.assert_array_equal(qn.transform(probe), back.transform(probe))
    assert back.output_columns == qn.output_columns
    raw = json.loads((tmp_path / "n.json").read_text())
    raw["format_version"] = 2
    (tmp_path / "n.json").write_text(json.dumps(raw))
    with pytest.raises(ArtifactError, match="format version 2"):
        QuantileNormalizer.load(tmp_path / "n.json")
    with pytest.raises(ArtifactError):
        QuantileNormalizer.load(tmp_path / "missing.json")


def test_sampled_fit_is_deterministic_and_bad_input_fails() -> None:
    v = np.random.default_rng(4).random(10_000)
    a = QuantileNormalizer.fit({"v": v}, max_values=1_000, seed=1)
    b = QuantileNormalizer.fit({"v": v}, max_values=1_000, seed=1)
    np.testing.assert_array_equal(a.column("v").knots, b.column("v").knots)
    with pytest.raises(FunnelrecError, match="infinite"):
        QuantileNormalizer.fit({"v": np.array([1.0, np.inf])})
    with pytest.raises(FunnelrecError, match="lacks"):
        a.transform({"w": v})
