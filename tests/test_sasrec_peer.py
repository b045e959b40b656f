"""benchmarks/sasrec.py: the SASRec peer learns a plain sequence rule and is deterministic."""

from __future__ import annotations

import numpy as np

from funnelrec.baselines import Jagged
from tests.scripts import load_script

ITEMS = 30


sasrec = load_script("sasrec")


def successor_world(users: int = 200, seed: int = 0) -> list[np.ndarray]:
    """Item i is always followed by item i + 1: runs of 5-12 items from a random start."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(users):
        n = int(rng.integers(5, 13))
        start = int(rng.integers(1, ITEMS - n + 2))
        rows.append(np.arange(start, start + n, dtype=np.int64))
    return rows


def fit(rows: list[np.ndarray], seed: int = 0, padding: str = "left"):  # type: ignore[no-untyped-def]
    train = Jagged.from_rows([r[:-2] for r in rows])
    valid_target = np.array([r[-2] for r in rows])
    config = sasrec.SASRecConfig(
        hidden=32,
        max_len=12,
        batch_size=32,
        max_epochs=5,
        patience=5,
        seed=seed,
        threads=1,
        padding=padding,  # type: ignore[arg-type]
    )
    return sasrec.fit_sasrec(train, ITEMS, train, valid_target, config)


def test_learns_the_successor_and_is_deterministic() -> None:
    rows = successor_world()
    run = fit(rows)
    plus_val = Jagged.from_rows([r[:-1] for r in rows])
    scores = run.score(plus_val)
    assert scores.shape == (len(rows), ITEMS + 1) and scores.dtype == np.float32
    assert np.all(np.isneginf(scores[:, 0]))
    # the protocol's ranking: the items already in the history are excluded (a run never
    # repeats an item here); by chance HR@1 would be about 1 in 20
    ranked = scores.copy()
    ranked[plus_val.rows(), plus_val.values] = -np.inf
    hr1 = np.mean(ranked.argmax(1) == np.array([r[-1] for r in rows]))
    assert hr1 > 0.8
    assert run.history[run.best_epoch - 1]["valid hr@10"] > 0.8
    assert run.history[-1]["loss"] < run.history[0]["loss"]
    assert 1 <= run.best_epoch <= run.epochs_run == 5 and not run.stopped_on_time
    np.testing.assert_array_equal(fit(rows).score(plus_val), scores)


def test_windows_make_every_transition_a_target_once() -> None:
    h = Jagged.from_rows([np.arange(1, 8), [9], [], [4, 5]])
    last = sasrec.training_windows(h, 3, "last")
    np.testing.assert_array_equal(last, [[4, 5, 6, 7], [0, 0, 4, 5]])
    every = sasrec.training_windows(h, 3, "all")
    np.testing.assert_array_equal(every, [[4, 5, 6, 7], [1, 2, 3, 4], [0, 0, 4, 5]])


def test_the_chunked_loss_is_cross_entropy_with_its_gradients() -> None:
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(37, 8, generator=g, requires_grad=True)
    weights = torch.randn(50, 8, generator=g, requires_grad=True)
    target = torch.randint(0, 50, (37,), generator=g)
    expected = F.cross_entropy(hidden @ weights.T, target, reduction="sum") * 0.5
    expected.backward()
    want = hidden.grad.clone(), weights.grad.clone()  # type: ignore[union-attr]
    hidden.grad = weights.grad = None
    got = sasrec.full_softmax_ce(hidden, weights, target, rows=10) * 0.5  # 4 uneven chunks
    got.backward()
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(hidden.grad, want[0])
    torch.testing.assert_close(weights.grad, want[1])


def test_right_padded_windows_keep_the_items_at_the_start() -> None:
    h = Jagged.from_rows([np.arange(1, 8), [9], [], [4, 5]])
    last = sasrec.training_windows(h, 3, "last", "right")
    np.testing.assert_array_equal(last, [[4, 5, 6, 7], [4, 5, 0, 0]])
    every = sasrec.training_windows(h, 3, "all", "right")
    np.testing.assert_array_equal(every, [[4, 5, 6, 7], [1, 2, 3, 4], [4, 5, 0, 0]])


def test_right_padding_learns_the_successor_too() -> None:
    rows = successor_world(seed=1)
    plus_val = Jagged.from_rows([r[:-1] for r in rows])
    ranked = fit(rows, padding="right").score(plus_val)
    ranked[plus_val.rows(), plus_val.values] = -np.inf
    assert np.mean(ranked.argmax(1) == np.array([r[-1] for r in rows])) > 0.8


def test_right_padding_counts_positions_from_the_first_item() -> None:
    import dataclasses

    import torch

    torch.manual_seed(0)
    config = sasrec.SASRecConfig(hidden=16, max_len=6, dropout=0.0, padding="right")
    right = sasrec.SASRec(ITEMS, config).eval()
    left = sasrec.SASRec(ITEMS, dataclasses.replace(config, padding="left")).eval()
    left.load_state_dict(right.state_dict())
    h = Jagged.from_rows([[3, 4, 5], np.arange(1, 10)])
    got = sasrec._final_states(right, h)
    with torch.no_grad():
        # the short history at positions 0..2 whatever the padding; the long one's last 6
        torch.testing.assert_close(got[0], right(torch.tensor([[3, 4, 5]]))[0, -1])
        torch.testing.assert_close(got[1], right(torch.tensor([[4, 5, 6, 7, 8, 9]]))[0, -1])
        # left padding puts the short history at positions 3..5: a different state
        got_left = sasrec._final_states(left, h)
        torch.testing.assert_close(got_left[0], left(torch.tensor([[3, 4, 5]]))[0, -1])
        torch.testing.assert_close(got_left[1], got[1])
    assert not torch.allclose(got_left[0], got[0])


def test_xavier_attention_initialisation_and_bad_settings() -> None:
    import pytest
    import torch

    torch.manual_seed(0)
    normal = sasrec.SASRec(ITEMS, sasrec.SASRecConfig(hidden=32, qkv_init="normal"))
    xavier = sasrec.SASRec(ITEMS, sasrec.SASRecConfig(hidden=32, qkv_init="xavier"))
    bound = (6.0 / (4 * 32)) ** 0.5
    for model, low, high in ((normal, 0.015, 0.025), (xavier, 0.8 * bound / 3**0.5, bound)):
        for block in model.blocks:
            for layer in (block.attention.query, block.attention.key_value):
                w = layer.weight.detach()
                assert low < float(w.std()) < high
                assert float(w.abs().max()) <= (bound if model is xavier else 1.0)
        # the output projection and the rest keep the small normal initialisation
        assert 0.015 < float(model.blocks[0].attention.out.weight.detach().std()) < 0.025
    with pytest.raises(ValueError, match="padding"):
        sasrec.SASRecConfig(padding="middle")  # type: ignore[arg-type]
