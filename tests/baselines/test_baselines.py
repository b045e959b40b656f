"""Hand-checked small cases for the non-neural recommenders of funnelrec.baselines."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from funnelrec.baselines import (
    ALS,
    BPR,
    CoWatch,
    Interactions,
    ItemKNN,
    Jagged,
    Popularity,
    load_baseline,
    top_n_per_row,
    upload_times,
)
from funnelrec.baselines.base import top_k_by_score
from funnelrec.errors import ArtifactError, DataError, FunnelrecError


def table(rows: list[tuple[int, int, int]]) -> pa.Table:
    """(user, item, ts) rows -> a training table."""
    u, i, t = zip(*rows, strict=True)
    return pa.table({"user_id": list(u), "item_id": list(i), "ts": list(t)})


# ---------------------------------------------------------------------------------------
# Inputs


def test_interactions_sorted_by_user_then_time_ties_in_row_order() -> None:
    data = Interactions.of(
        {
            "user_id": np.array([2, 1, 1, 1]),
            "item_id": np.array([9, 7, 8, 6]),
            "ts": np.array([0, 5, 3, 5]),
        }
    )
    assert data.user.tolist() == [1, 1, 1, 2]
    assert data.item.tolist() == [8, 7, 6, 9]  # ts 3, then the two ts 5 in row order


@pytest.mark.parametrize(
    ("cols", "message"),
    [
        ({"user_id": [1], "item_id": [1]}, "missing column(s) ts"),
        ({"user_id": [1, 2], "item_id": [1], "ts": [0, 0]}, "item_id': has 1 values"),
        ({"user_id": [1], "item_id": [0], "ts": [0]}, "id 0 is below 1"),
        ({"user_id": [1], "item_id": [1.5], "ts": [0]}, "1-D integer array"),
        ({"user_id": [], "item_id": [], "ts": []}, "no training interactions"),
    ],
)
def test_bad_training_input_is_named(cols: dict[str, list[float]], message: str) -> None:
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Popularity().fit({k: np.array(v) for k, v in cols.items()})


def test_jagged_forms_agree() -> None:
    a = Jagged.from_rows([[3, 5], [], [7]])
    b = Jagged.from_bag([3, 5, 7], [0, 2, 2])
    assert a.values.tolist() == b.values.tolist() == [3, 5, 7]
    assert a.offsets.tolist() == b.offsets.tolist() == [0, 2, 2, 3]
    assert a.from_end().tolist() == [2, 1, 1]
    with pytest.raises(FunnelrecError, match="offsets"):
        Jagged.of(Jagged(np.array([1, 2]), np.array([0, 3])))


# ---------------------------------------------------------------------------------------
# Popularity


def test_popularity_all_time_and_window_orders() -> None:
    # item 1: 3 old watches; item 2: 2 recent ones; item 3: 1 recent one; item 4 never
    train = table([(1, 1, 0), (2, 1, 10), (3, 1, 20), (1, 2, 95), (2, 2, 99), (3, 3, 100)])
    ids, scores = Popularity().fit(train, num_items=4).top_k([], k=10)
    assert ids.tolist() == [1, 2, 3]  # item 4 has no watches: not a candidate
    assert scores.tolist() == [3, 2, 1]
    ids, scores = Popularity(window_s=10).fit(train, num_items=4).top_k([], k=10)
    assert ids.tolist() == [2, 3] and scores.tolist() == [2, 1]  # (90, 100] only
    # a reference time in the past ignores what came after it
    ids, _ = Popularity(window_s=50).fit(train, num_items=4, now=30).top_k([], k=10)
    assert ids.tolist() == [1]


def test_popularity_half_life_decays_counts() -> None:
    train = table([(1, 1, 0), (2, 1, 0), (1, 2, 100)])
    m = Popularity(half_life_s=50).fit(train, num_items=2)
    s = m.score([[1], []])
    assert s.shape == (2, 3) and s[0, 0] == -np.inf
    # item 1: two watches 100 s (two half-lives) before now = 2 * 0.25; item 2: 1
    np.testing.assert_allclose(s[:, 1:], [[0.5, 1.0], [0.5, 1.0]])


def test_fresh_popularity_formula_and_exclusions() -> None:
    # now = 100; upload ages: item 1 old (1000 s), item 2 age 0, item 3 unknown,
    # item 4 uploaded in the future
    train = table([(1, 1, 90), (2, 1, 95), (3, 1, 100), (1, 2, 100), (2, 3, 99)])
    upload = np.array([0, -900, 100, np.nan, 500])
    m = Popularity(fresh_half_life_s=100, fresh_boost=3.0, fresh_prior=1.0)
    s = m.fit(train, num_items=4, upload_ts=upload).scores_
    expect_1 = (3 + 1) * (1 + 3 * 0.5**10)
    expect_2 = (1 + 1) * (1 + 3)
    expect_3 = (1 + 1) * 1
    np.testing.assert_allclose(s[1:], [expect_1, expect_2, expect_3, 0.0], rtol=1e-6)
    ids, _ = m.top_k([], k=10, exclude=[3])
    assert ids.tolist() == [2, 1]  # the fresh item overtakes the old one; 4 not yet uploaded
    with pytest.raises(FunnelrecError, match="upload_ts"):
        Popularity(fresh_half_life_s=10).fit(train)


def test_popularity_top_k_reads_its_ranking_as_a_full_sort_would_also_with_more_items() -> None:
    """Popularity ranks its items once; the head of that order, with exclusions and the
    floor, is the top k of a full sort (ties by smaller id), also once items are merged
    in by `with_more_items` (many of them tied, as fresh uploads at their full boost)."""
    rng = np.random.default_rng(0)
    n = 500
    users, items = rng.integers(1, 50, 3000), rng.integers(1, n + 1, 3000)
    train = table([(int(u), int(i), 10) for u, i in zip(users, items, strict=True)])
    m = Popularity().fit(train, num_items=n)

    def expected(scores: np.ndarray, k: int, ex: np.ndarray) -> list[int]:
        s = scores.astype(np.float64).copy()
        s[0] = -np.inf
        s[ex] = -np.inf
        ids = np.arange(len(s))
        order = np.lexsort((ids, -s))
        return [int(i) for i in order[:k] if s[i] > m.min_candidate_score]

    grown = m
    for step in range(3):
        for k, size in ((1, 0), (10, 5), (50, 200), (600, 30)):
            ex = rng.choice(np.arange(1, grown.num_items + 1), size, replace=False)
            ids, scores = grown.top_k([], k, exclude=ex)
            assert ids.tolist() == expected(grown.scores_, k, ex), (step, k)
            assert scores.tolist() == grown.scores_[ids].tolist()
        tail = np.full(300, 7.0, np.float32)  # many new items tied at one score
        tail[::7] = rng.integers(0, 12, len(tail[::7]))
        tail[5] = -np.inf  # an id the catalogue skipped
        before = grown.scores_.copy()
        grown = grown.with_more_items(np.concatenate([grown.scores_, tail]))
        np.testing.assert_array_equal(grown.scores_[: len(before)], before)
    assert m.num_items == n  # the original is unchanged


def test_upload_times_by_item_id() -> None:
    items = pa.table({"item_id": [2, 1], "upload_ts": pa.array([50, None], pa.int64())})
    up = upload_times(items, num_items=3)
    assert up[2] == 50 and np.isnan(up[[0, 1, 3]]).all()


def test_num_items_below_training_ids_is_refused() -> None:
    with pytest.raises(DataError, match="above num_items=2"):
        Popularity().fit(table([(1, 3, 0)]), num_items=2)


# ---------------------------------------------------------------------------------------
# Co-watch


def test_cowatch_is_asymmetric_and_normalised() -> None:
    # B (2) always follows A (1); C (3) follows A once; nothing is ever followed by A
    train = table([(1, 1, 0), (1, 2, 1), (2, 1, 0), (2, 2, 1), (3, 1, 0), (3, 3, 1), (3, 2, 2)])
    m = CoWatch(next_n=1).fit(train, num_items=3)
    ids, scores = m.neighbours(1)
    assert ids.tolist() == [2, 3]
    np.testing.assert_allclose(scores, [2 / 3, 1 / 3])  # P(next = j | A): A->B 2, A->C 1
    assert m.neighbours(2)[0].tolist() == []  # B -> A never counted
    assert m.neighbours(3)[0].tolist() == [2]
    assert m.top_k([2], k=5)[0].tolist() == []  # nothing follows B: no candidates
    assert m.top_k([2, 1], k=5, exclude=[1, 2])[0].tolist() == [3]


def test_cowatch_next_n_and_time_window() -> None:
    train = table([(1, 1, 0), (1, 2, 10), (1, 3, 1000)])
    assert CoWatch(next_n=1).fit(train, num_items=3).neighbours(1)[0].tolist() == [2]
    assert CoWatch(next_n=2).fit(train, num_items=3).neighbours(1)[0].tolist() == [2, 3]
    m = CoWatch(next_n=2, window_s=100).fit(train, num_items=3)
    assert m.neighbours(1)[0].tolist() == [2]  # 3 came 1000 s later


def test_cowatch_scores_from_last_watches_with_decay() -> None:
    train = table([(1, 1, 0), (1, 3, 1), (2, 2, 0), (2, 4, 1)])  # 1 -> 3, 2 -> 4
    m = CoWatch(next_n=1, last_n=1).fit(train, num_items=4)
    s = m.score([[1, 2]])
    assert s[0, 1:].tolist() == [0, 0, 0, 1]  # only the last watch (2) counts
    s = m.score([[1, 2]], last_n=2)
    assert s[0, 1:].tolist() == [0, 0, 0.5, 1]  # the one before weighs last_decay = 0.5


def test_top_n_per_row_keeps_largest_ties_by_smaller_column() -> None:
    import scipy.sparse as sp

    m = sp.csr_matrix(np.array([[0, 3, 1, 3, 2], [0, 0, 0, 0, 0], [5, 0, 0, 0, 1]], float))
    out = top_n_per_row(m, 2).toarray()
    assert out.tolist() == [[0, 3, 0, 3, 0], [0, 0, 0, 0, 0], [5, 0, 0, 0, 1]]


# ---------------------------------------------------------------------------------------
# ItemKNN


def test_itemknn_cosine_on_a_tiny_matrix() -> None:
    # users x items (1..3):  u1: 1 2   u2: 1 2 3   u3: 3
    train = table([(1, 1, 0), (1, 2, 0), (2, 1, 0), (2, 2, 0), (2, 3, 0), (3, 3, 0)])
    m = ItemKNN(neighbours=100).fit(train, num_items=3)
    sim = m.sim.toarray()[1:, 1:]
    r = 1 / np.sqrt(2 * 2)  # items 1-3 and 2-3 share u2; each has 2 users
    np.testing.assert_allclose(sim, [[0, 1, r], [1, 0, r], [r, r, 0]], rtol=1e-6)
    s = m.score([[1], [1, 1, 3], []])
    np.testing.assert_allclose(s[0, 1:], [0, 1, r], rtol=1e-6)
    np.testing.assert_allclose(s[1, 1:], [r, 1 + r, r], rtol=1e-6)  # duplicates count once
    assert (s[2, 1:] == 0).all()
    one = ItemKNN(neighbours=1).fit(train, num_items=3)
    assert one.neighbours(3)[0].tolist() == [1]  # tie between 1 and 2: the smaller id


# ---------------------------------------------------------------------------------------
# Matrix factorisation


def planted(seed: int = 0) -> tuple[pa.Table, np.ndarray, np.ndarray, int]:
    """Two taste groups: users 1..40 watch items 1..20, users 41..80 items 21..40. Each
    user watches 8 of their group's items; one more of them is held out as the target."""
    rng = np.random.default_rng(seed)
    rows, targets = [], []
    for u in range(1, 81):
        lo = 1 if u <= 40 else 21
        items = rng.choice(np.arange(lo, lo + 20), size=9, replace=False)
        rows += [(u, int(i), t) for t, i in enumerate(items[:8])]
        targets.append(int(items[8]))
    return table(rows), np.arange(1, 81), np.array(targets), 40


def hit_rate(scores: np.ndarray, train: pa.Table, targets: np.ndarray, k: int = 10) -> float:
    s = scores.copy()
    u = train.column("user_id").to_numpy() - 1
    s[u, train.column("item_id").to_numpy()] = -np.inf  # seen items out of the ranking
    top = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return float((top == targets[:, None]).any(axis=1).mean())


@pytest.mark.parametrize(
    "model", [BPR(4, iterations=60, learning_rate=0.05, threads=1), ALS(2, threads=1)]
)
def test_matrix_factorisation_beats_random_on_planted_groups(model: BPR | ALS) -> None:
    train, users, targets, n = planted()
    model.fit(train, num_items=n)
    hist = [train.filter(pa.compute.equal(train["user_id"], u))["item_id"] for u in users]
    s = model.score([h.to_numpy() for h in hist], users=users)
    assert s.shape == (80, n + 1) and (s[:, 0] == -np.inf).all()
    # random: 10 of the 32 unseen items ~ 0.31; within the right group 10 of 12 ~ 0.83
    assert hit_rate(s, train, targets) >= 0.7


def test_als_fold_in_matches_learned_vectors_and_bpr_needs_users() -> None:
    train, users, _, n = planted(1)
    als = ALS(8, iterations=15, regularization=0.1, threads=1).fit(train, num_items=n)
    hist = [
        train.filter(pa.compute.equal(train["user_id"], u))["item_id"].to_numpy() for u in users
    ]
    learned = als.user_vectors(hist, users=users)
    folded = als.user_vectors(hist)  # users not given: least-squares fold-in
    cos = (
        (learned * folded).sum(1) / np.linalg.norm(learned, axis=1) / np.linalg.norm(folded, axis=1)
    )
    assert cos.min() > 0.99
    # an unknown user among known ones is folded in too
    mixed = als.user_vectors(hist[:2], users=[1, 999])
    np.testing.assert_allclose(mixed[1], folded[1], rtol=1e-4, atol=1e-5)
    bpr = BPR(8, iterations=5, threads=1).fit(train, num_items=n)
    with pytest.raises(FunnelrecError, match="pass users="):
        bpr.score(hist[:1])


# ---------------------------------------------------------------------------------------
# Persistence


def fitted_models() -> list[Popularity | CoWatch | ItemKNN | BPR | ALS]:
    train, _, _, n = planted(2)
    upload = np.r_[0, np.arange(n)]
    return [
        Popularity(window_s=5, half_life_s=3.0).fit(train, num_items=n),
        Popularity(fresh_half_life_s=10).fit(train, num_items=n, upload_ts=upload),
        CoWatch(next_n=3, neighbours=5, last_n=2).fit(train, num_items=n),
        ItemKNN(neighbours=7).fit(train, num_items=n),
        BPR(4, iterations=3, threads=1).fit(train, num_items=n),
        ALS(4, iterations=3, threads=1).fit(train, num_items=n),
    ]


def test_save_load_round_trip(tmp_path: Path) -> None:
    hist = [[1, 2, 3], [25], []]
    for i, model in enumerate(fitted_models()):
        path = model.save(tmp_path / f"m{i}")
        back = load_baseline(path)
        assert type(back) is type(model) and back.config() == model.config()
        assert type(model).load(path).num_items == model.num_items
        kw = {"users": [1, 41, 2]} if isinstance(model, BPR | ALS) else {}
        np.testing.assert_array_equal(back.score(hist, **kw), model.score(hist, **kw))
        kw1 = {"users": [1]} if isinstance(model, BPR | ALS) else {}
        a = model.top_k([1, 2], 5, exclude=[1], **kw1)
        b = back.top_k([1, 2], 5, exclude=[1], **kw1)
        assert a[0].tolist() == b[0].tolist() and 1 not in a[0].tolist()
        assert sorted(p.name for p in path.iterdir()) == sorted(
            ["baseline.json", *json.loads((path / "baseline.json").read_text())["arrays"].values()]
        )
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp leftovers


def test_load_refuses_broken_and_mismatched(tmp_path: Path) -> None:
    model = fitted_models()[2]
    path = model.save(tmp_path / "cw")
    with pytest.raises(ArtifactError, match="not 'itemknn'"):
        ItemKNN.load(path)
    with pytest.raises(DataError, match="already exists"):
        model.save(path)
    model.save(path, force=True)
    meta = json.loads((path / "baseline.json").read_text())
    (path / "baseline.json").write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(ArtifactError, match="format version 99"):
        load_baseline(path)
    (path / "baseline.json").write_text(json.dumps({**meta, "num_items": 3}))
    with pytest.raises(ArtifactError, match="do not fit"):
        load_baseline(path)
    (path / "indices.npy").unlink()
    (path / "baseline.json").write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match="broken baseline"):
        load_baseline(path)
    with pytest.raises(ArtifactError, match="not a saved baseline"):
        load_baseline(tmp_path / "nowhere")


def test_unfitted_and_bad_requests_are_refused() -> None:
    with pytest.raises(FunnelrecError, match="not fitted"):
        ItemKNN().score([[1]])
    model = fitted_models()[3]
    with pytest.raises(FunnelrecError, match="outside the model's items"):
        model.score([[1, 99]])
    with pytest.raises(FunnelrecError, match="k must be at least 1"):
        model.top_k([1], 0)
    with pytest.raises(FunnelrecError, match="neighbours must be >= 1"):
        ItemKNN(neighbours=0)


def test_top_k_by_score_is_the_head_of_a_full_sort() -> None:
    rng = np.random.default_rng(0)
    cases = ((0, 5), (3, 5), (50, 5), (1000, 300), (1000, 1000), (1000, 1), (5000, 50))
    for (n, k), levels in itertools.product(cases, (20, 2)):
        ids = rng.permutation(n).astype(np.int64) + 1
        scores = rng.integers(0, levels, n).astype(np.float32)  # many ties at the k-th
        order = np.lexsort((ids, -scores))[:k]
        got_ids, got_scores = top_k_by_score(ids, scores, k)
        assert got_ids.tolist() == ids[order].tolist(), (n, k)
        assert got_scores.tolist() == scores[order].tolist()
