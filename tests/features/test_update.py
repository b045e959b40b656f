"""Features updates: the features of a dataset that grew by a period, extending the
previous ones (data written by the tests: `periods.py`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from typer.testing import CliRunner

from funnelrec.cli import app
from funnelrec.errors import FunnelrecError
from funnelrec.features import Features, FeaturesConfig
from funnelrec.features.build import build_features
from funnelrec.features.loader import read_examples
from funnelrec.features.normalize import QuantileNormalizer
from funnelrec.features.update import FeaturesUpdate, normalizer_drift
from funnelrec.features.vocab import Vocabulary
from tests.features.periods import DAY, append_day_2, write_periods

CONFIG = FeaturesConfig(history_n=5, n_quantiles=20)


@pytest.fixture(scope="module")
def two_periods(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(root, features of day 1, features updated for days 1-2)."""
    root = tmp_path_factory.mktemp("periods")
    ds, day2 = write_periods(root)
    build_features(ds, root / "f1", split="time", config=CONFIG, progress=False)
    append_day_2(root, day2)
    build_features(
        ds, root / "f2", split="time", progress=False, update=FeaturesUpdate(root / "f1")
    )
    return root, root / "f1", root / "f2"


def test_extend_keeps_old_ids_and_truncates_only_the_new_values() -> None:
    old = Vocabulary.fit("item", pa.array([5, 5, 5, 7, 7, 9]))
    seen = Vocabulary.fit("item", pa.array([9, 9, 9, 9, 11, 11, 11, 12, 12, 13]))
    grown = old.extend(seen, max_new=2, min_count=2)
    assert grown.values.tolist() == [5, 7, 9, 11, 12]  # 13: below min_count
    assert grown.counts.tolist() == [1, 0, 0, 4, 3, 2]  # the newer data's counts
    assert grown.extends(old) and not old.extends(grown)
    assert grown.lookup(np.array([5, 11, 13])).tolist() == [1, 4, 0]
    assert old.extend(seen, max_new=1).values.tolist() == [5, 7, 9, 11]
    other = Vocabulary.fit("item", pa.array([7, 7, 5]))
    assert not other.extends(old)


def test_an_update_extends_every_vocabulary_and_pins_the_widths(
    two_periods: tuple[Path, Path, Path],
) -> None:
    _, f1_path, f2_path = two_periods
    f1, f2 = Features.open(f1_path), Features.open(f2_path)
    grew = []
    for name, entry in f1.manifest["vocabularies"].items():
        old, new = f1.vocab(name), f2.vocab(name)
        assert new.extends(old), name
        assert f2.manifest["vocabularies"][name]["dim"] == entry["dim"]
        if len(new) > len(old):
            grew.append(name)
    assert {"item", "rank_item", "token"} <= set(grew)
    growth = f2.manifest["update"]["vocab_growth"]
    assert growth["item"] == {"old": len(f1.vocab("item")), "new": len(f2.vocab("item"))}
    assert f2.manifest["config"]["history_n"] == CONFIG.history_n  # the base's config


def test_an_update_keeps_the_normalisers_and_reports_their_drift(
    two_periods: tuple[Path, Path, Path],
) -> None:
    _, f1_path, f2_path = two_periods
    f1, f2 = Features.open(f1_path), Features.open(f2_path)
    for stage in ("candidates", "ranking"):
        assert f2.normalizer(stage).to_dict() == f1.normalizer(stage).to_dict()
    update = f2.manifest["update"]
    assert update["normalizers"] == "kept"
    age = update["drift"]["candidates"]["age"]
    # day 2's users are older: the median lands high on the old map, some beyond it
    assert age["ks"] > 0.1 and age["p50"] > 0.5 and age["above_range"] > 0
    assert "item_prior_watches" in update["drift"]["ranking"]


def test_an_update_trains_on_the_new_period_and_a_replay_sample(
    two_periods: tuple[Path, Path, Path],
) -> None:
    root, _, f2_path = two_periods
    f2 = Features.open(f2_path)
    update = f2.manifest["update"]
    since = update["since"]
    assert since == 2 * DAY  # the start of the appended period
    ts = np.asarray(read_examples(f2, "candidates", "train", ["ts"]).column("ts").to_numpy())
    new, replayed = int((ts >= since).sum()), int((ts < since).sum())
    assert update["train_examples"] == {"new": new, "replayed": replayed}
    full = root / "f2-all"
    build_features(
        root / "ds",
        full,
        split="time",
        progress=False,
        update=FeaturesUpdate(root / "f1", replay=1.0),
    )
    ts_all = read_examples(Features.open(full), "candidates", "train", ["ts"]).column("ts")
    older = int((np.asarray(ts_all.to_numpy()) < since).sum())
    assert 0 < replayed < older  # about a tenth of them
    # example age is measured to the end of the new window
    t = read_examples(f2, "candidates", "train", ["ts", "example_age"])
    ages = np.asarray(t.column("example_age").to_numpy())
    assert ages.min() == 0.0 and np.asarray(t.column("ts").to_numpy())[ages.argmin()] >= since


def test_refit_and_the_command_line(two_periods: tuple[Path, Path, Path]) -> None:
    root, f1_path, _ = two_periods
    out = root / "f2-refit"
    result = CliRunner().invoke(
        app,
        [
            "features",
            "build",
            "--data",
            str(root / "ds"),
            "--update-from",
            str(f1_path),
            "--out",
            str(out),
            "--refit-normalizers",
            "--replay",
            "0",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "vocabularies extended" in result.output and "normaliser drift" in result.output
    f1, f2 = Features.open(f1_path), Features.open(out)
    assert f2.split == "time"  # the base's, without --split
    assert f2.manifest["update"]["normalizers"] == "refitted"
    assert f2.normalizer("candidates").to_dict() != f1.normalizer("candidates").to_dict()
    assert f2.manifest["update"]["train_examples"]["replayed"] == 0
    with pytest.raises(FunnelrecError, match="same"):
        build_features(
            root / "ds", root / "bad", split="last", update=FeaturesUpdate(f1_path), progress=False
        )
    with pytest.raises(FunnelrecError, match="replay"):
        FeaturesUpdate(f1_path, replay=2.0)


def test_drift_is_zero_on_the_data_a_map_was_fitted_on() -> None:
    rng = np.random.default_rng(0)
    values = rng.exponential(size=5000)
    qn = QuantileNormalizer.fit({"x": values}, n_quantiles=100, powers=False)
    same = normalizer_drift(qn, {"x": values})["x"]
    moved = normalizer_drift(qn, {"x": values + 1.0})["x"]
    assert same["ks"] < 0.02 and abs(same["p50"] - 0.5) < 0.02
    assert moved["ks"] > 0.3 and moved["above_range"] > 0.0
