"""benchmarks/cold_items.py on a tiny MovieLens-100k-format fixture written here: the cut
(no cold item in the training data, only cold items as cold targets), the id-only arm's
zero on cold items by construction, and the results' structure (never a figure's value
beyond what holds by construction)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from funnelrec.data.dataset import Dataset
from funnelrec.data.loaders.movielens import ML100K_GENRES, import_movielens
from funnelrec.errors import FunnelrecError
from tests.scripts import load_script

cold_items = load_script("cold_items")

USERS, WARM, COLD = 40, 16, 4  # items 1..16 rated from the start, 17..20 only at the end
LATE = 10_000  # every rating of a cold item is at or after this time
# A tiny model: the benchmark's config with small widths and one or two passes.
TINY = ["dim=8", "train.epochs=2", "train.batch_size=64", "valid_examples=200"]


def write_fixture(root: Path) -> Path:
    """u.data, u.user and u.item in the ml-100k layout: two genres; 500 ratings of the
    warm items before LATE (each warm item rated early on), then 25 of cold and 25 of
    warm items after it, so that the 0.9 quantile of the times falls before LATE."""
    rng = np.random.default_rng(7)
    src = root / "ml-100k"
    src.mkdir()
    rows: set[tuple[int, int]] = set()
    lines = []

    def rate(user: int, item: int, ts: int) -> None:
        if (user, item) not in rows:
            rows.add((user, item))
            lines.append(f"{user}\t{item}\t{rng.integers(1, 6)}\t{ts}")

    for item in range(1, WARM + 1):  # each warm item's first rating, early
        rate(int(rng.integers(1, USERS + 1)), item, 1_000 + item)
    while len(lines) < 500:
        user, item = int(rng.integers(1, USERS + 1)), int(rng.integers(1, WARM + 1))
        rate(user, item, int(rng.integers(1_100, LATE)))
    for n in range(50):
        item = WARM + 1 + (n // 2) % COLD if n % 2 == 0 else int(rng.integers(1, WARM + 1))
        rate(int(rng.integers(1, USERS + 1)), item, LATE + n)
    (src / "u.data").write_text("\n".join(lines) + "\n")
    (src / "u.user").write_text(
        "".join(f"{u}|{20 + u}|{'MF'[u % 2]}|other|0{u:04d}\n" for u in range(1, USERS + 1))
    )
    items = []
    for i in range(1, WARM + COLD + 1):
        genre = 1 + i % 2  # Action or Adventure
        flags = "|".join("1" if g == genre else "0" for g in range(len(ML100K_GENRES)))
        kind = "Space" if genre == 1 else "Castle"
        release = "01-Jan-1998" if i > WARM else "01-Jan-1995"
        items.append(f"{i}|{kind} Story {i} (1995)|{release}||http://x|{flags}\n")
    (src / "u.item").write_text("".join(items))
    out = root / "data"
    import_movielens(src, out)
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_fixture(tmp_path_factory.mktemp("ml"))


def test_the_cut_keeps_cold_items_out_of_training(data: Path, tmp_path: Path) -> None:
    ds = Dataset.open(data)
    split = cold_items.cold_split(ds, cut=0.9, valid_frac=0.1)
    assert split.t_valid < split.t_cut <= LATE
    assert set(split.cold.tolist()) == set(range(WARM + 1, WARM + COLD + 1))

    train = Dataset.open(cold_items.write_training_data(ds, tmp_path / "train", split.t_cut))
    w = train.table("watches")
    assert w.num_rows == split.train_ratings
    assert max(w.column("ts").to_pylist()) < split.t_cut
    assert not set(w.column("item_id").to_pylist()) & set(split.cold.tolist())
    # the catalogue is whole: cold items keep their content for the content tower
    assert train.num_rows("items") == ds.num_rows("items")

    cold = split.queries["cold"]
    assert len(cold) > 0
    for targets in cold.targets:
        assert targets.size and set(targets.tolist()) <= set(split.cold.tolist())
    with_history = split.queries["cold_with_history"]
    assert set(with_history.users.tolist()) <= set(cold.users.tolist())
    assert all(h.size for h in with_history.histories)
    every = split.queries["all"]
    assert set(cold.users.tolist()) <= set(every.users.tolist())
    assert sum(t.size for t in every.targets) == split.test_ratings  # one rating a pair
    for history in every.histories:
        assert not set(history.tolist()) & set(split.cold.tolist())


def test_bad_settings_are_refused(data: Path) -> None:
    ds = Dataset.open(data)
    with pytest.raises(FunnelrecError, match="--cut"):
        cold_items.cold_split(ds, cut=1.0)
    with pytest.raises(FunnelrecError, match="--valid-frac"):
        cold_items.cold_split(ds, valid_frac=0.0)
    with pytest.raises(FunnelrecError, match="--arms"):
        cold_items.run(data, Path("/nonexistent"), Path("/nonexistent.json"), arms=["bogus"])


def test_both_arms_end_to_end(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "cold_items.json"
    cold_items.run(data, tmp_path / "work", out, seeds=(0, 1), overrides=TINY)
    result = json.loads(out.read_text())
    assert result["complete"] is True
    assert result["benchmark"] == "cold_items"
    assert result["machine"]["cpus"] >= 1
    assert {"head", "uncommitted_changes"} <= result["code"].keys()
    assert result["settings"]["seeds"] == [0, 1]
    assert result["split"]["cold_items"] == COLD
    assert set(result["arms"]) == {"id-only", "content"}
    for part in cold_items.PARTS:  # the references: no model, the whole catalogue
        assert result["references"]["newest_first"][part]["representable_targets"] == 1.0
        assert 0.0 <= result["split"]["chance"][part]["hr@10"] <= 1.0

    metrics = {f"{m}@{k}" for m in ("hr", "recall") for k in cold_items.KS}
    for name, arm in result["arms"].items():
        for part in cold_items.PARTS:
            for stat in ("", " std", " min", " max"):
                figures = arm[f"{part}{stat}"]
                assert figures.keys() == metrics | {"representable_targets"}, (name, part)
                assert all(0.0 <= v <= 1.0 and math.isfinite(v) for v in figures.values())
        assert set(arm["seeds"]) == {"0", "1"}
        for run in arm["seeds"].values():
            assert 1 <= run["best_epoch"] <= 2
            assert run["cold"]["hr@50"] >= run["cold"]["hr@10"]

    id_only, content = result["arms"]["id-only"], result["arms"]["content"]
    # by construction: the id-only model cannot represent an item nobody rated in training
    assert id_only["cold max"]["hr@50"] == 0.0 and id_only["cold max"]["recall@50"] == 0.0
    assert id_only["cold"]["representable_targets"] == 0.0
    assert content["cold"]["representable_targets"] == 1.0
    for run in id_only["seeds"].values():
        assert run["exported_items"] == WARM
    for run in content["seeds"].values():
        assert run["exported_items"] == WARM + COLD
    # the catalogue is tiny: every rankable item fits in the content tower's top 50
    assert content["cold min"]["hr@50"] == 1.0
