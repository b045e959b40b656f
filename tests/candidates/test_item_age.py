"""The content tower's item-age term (`funnelrec/candidates/content.py`, `ItemAge`): each
item priced at its age at the example's time in training, items not yet uploaded left
out, the serving query and exported vectors that give the same scores, and a model that
learns to retrieve what was just uploaded."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from funnelrec.candidates import CandidateConfig, CandidateModel
from funnelrec.candidates.content import AGE_BUCKETS, UNKNOWN_AGE, age_buckets
from funnelrec.errors import FunnelrecError
from funnelrec.features.batch import CandidateBatch
from tests.candidates.test_content import CONTENT, INPUTS, batch, random_content

torch.set_num_threads(1)

DAY = 86_400.0
T_END = 40 * DAY
UNKNOWN_ITEM = 3


def aged_model(**kw: object) -> CandidateModel:
    """A content model whose item j (vocabulary id) was uploaded on day j, item 3 at an
    unknown time, with random (not zero) age weights."""
    torch.manual_seed(0)
    base: dict[str, object] = {"dim": 8, "depth": 2, "num_negatives": 20, "item_content": True}
    base.update(kw)
    config = CandidateConfig(**base)  # type: ignore[arg-type]
    upload = torch.arange(INPUTS.item_vocab, dtype=torch.float64) * DAY
    upload[UNKNOWN_ITEM] = -math.inf
    rows = replace(random_content(INPUTS.item_vocab), upload_ts=upload)
    m = CandidateModel(
        config, INPUTS, content_inputs=CONTENT, content_rows=rows, content_t_end=int(T_END)
    )
    if m.item_age is not None:
        with torch.no_grad():
            m.item_age.weights.weight.normal_(0.0, 0.5)
            m.item_age.weights.bias.normal_(0.0, 0.5)
    return m


def timed_batch(b: int = 8, seed: int = 0) -> CandidateBatch:
    """Examples at days 10-40, so that many items are not yet uploaded for them."""
    g = torch.Generator().manual_seed(seed + 100)
    ts = (torch.rand(b, generator=g, dtype=torch.float64) * 30 + 10) * DAY
    out = batch(b, seed)
    # labels uploaded before their examples, as every watch is
    label = (torch.rand(b, generator=g) * (ts / DAY).floor().clamp(max=30)).long().clamp(min=1)
    return replace(out, ts=ts.long(), label=label)


def test_ages_fall_in_their_buckets() -> None:
    ages = torch.tensor([-1.0, 0.1, 0.25, 0.3, 1.5, 400.0, math.inf, -math.inf, math.nan])
    assert age_buckets(ages).tolist() == [0, 0, 0, 1, 3, 14, UNKNOWN_AGE, UNKNOWN_AGE, 15]
    assert UNKNOWN_AGE == AGE_BUCKETS - 1 == 15


def test_the_sorted_pair_terms_are_the_bucketed_ones() -> None:
    """The training step's fast path (uploads in ascending order) gives every pair the
    term that bucketing each age gives: ages on an edge, not yet uploaded, unknown."""
    from funnelrec.candidates.content import AGE_EDGES_DAYS, ItemAge

    g = torch.Generator().manual_seed(0)
    age = ItemAge(8)
    w = torch.randn(6, AGE_BUCKETS, generator=g)
    ts = torch.tensor([0.0, 0.3, 2.0, 20.0, 400.0, 1000.0], dtype=torch.float64) * DAY
    edges = torch.tensor(AGE_EDGES_DAYS, dtype=torch.float64)
    upload = (
        torch.cat(
            [
                torch.full((3,), -math.inf, dtype=torch.float64),
                (20.0 - edges) * DAY,  # ages exactly on an edge for the example of day 20
                torch.rand(40, generator=g, dtype=torch.float64) * 1000 * DAY - 100 * DAY,
                torch.tensor([20.0 * DAY, 20.0 * DAY + 1]),  # age 0, and 1 s in the future
            ]
        )
        .sort()
        .values
    )
    got = age.sorted_pair_terms(w, ts, upload)
    # every age bucketed on its own
    each = (ts[:, None] - upload[None, :]) / DAY
    want = w.gather(1, age_buckets(each)).masked_fill(each < 0, float("-inf"))
    assert bool((want == float("-inf")).any()) and bool(torch.isfinite(want).any())
    torch.testing.assert_close(got, want)


def _reference(m: CandidateModel, b: CandidateBatch, candidates: torch.Tensor) -> torch.Tensor:
    """The loss by hand: softmax over [label ; candidates] with every logit u . v + the
    age weight of the item's age at the example's time; a candidate equal to the label
    or uploaded after the example left out; the logQ correction on sampled candidates."""
    assert m.item_age is not None and m.content_rows is not None
    u = m.user_vector(b, b.example_age)
    d = m.config.dim
    table = m.item_embeddings()[:, :d]  # id row + content, without the exported age part
    w = m.item_age.weights(u)
    upload, ts = m.content_rows.upload_ts, b.ts.double()
    pos_age = (ts - upload[b.label]) / DAY
    pos = (u * table[b.label]).sum(1) + w.gather(1, age_buckets(pos_age)[:, None])[:, 0]
    age = (ts[:, None] - upload[candidates][None, :]) / DAY
    cand = u @ table[candidates].T + w.gather(1, age_buckets(age))
    if m.config.loss == "sampled":
        n = len(candidates)
        cand = cand - (m.softmax.log_q[candidates] + math.log(n))[None, :]
    left_out = (candidates[None, :] == b.label[:, None]) | (age < 0)
    cand = cand.masked_fill(left_out, -math.inf)
    return (torch.logsumexp(torch.cat([pos[:, None], cand], 1), 1) - pos).mean()


def _grads(m: CandidateModel, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    m.zero_grad()
    loss.backward()
    return {k: p.grad.clone() for k, p in m.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("c_rows", [True, False])
def test_the_sampled_loss_prices_every_item_at_the_examples_time(c_rows: bool) -> None:
    m = aged_model(c_softmax_rows=c_rows)
    b = timed_batch()
    torch.manual_seed(5)
    got = m.compute_loss(b)
    got_grads = _grads(m, got)
    torch.manual_seed(5)
    negatives = m.softmax.sample(m.softmax.num_negatives)
    upload = m.content_rows.upload_ts if m.content_rows is not None else None
    assert upload is not None
    # the draw holds items not yet uploaded for some examples, so the mask is exercised
    assert bool((upload[negatives][None, :] > b.ts.double()[:, None]).any())
    want = _reference(m, b, negatives)
    want_grads = _grads(m, want)
    torch.testing.assert_close(got.detach(), want.detach())
    assert set(got_grads) == set(want_grads)
    assert "item_age.weights.weight" in got_grads
    for name, g in want_grads.items():
        torch.testing.assert_close(got_grads[name], g, msg=name)


def test_the_full_loss_prices_every_item_at_the_examples_time() -> None:
    m = aged_model(loss="full")
    b = timed_batch()
    got = m.compute_loss(b)
    got_grads = _grads(m, got)
    want = _reference(m, b, torch.arange(1, INPUTS.item_vocab))
    # the reference masks the label among the candidates and scores it as the positive;
    # the full loss scores it in place: the same softmax
    want_grads = _grads(m, want)
    torch.testing.assert_close(got.detach(), want.detach())
    for name, g in want_grads.items():
        torch.testing.assert_close(got_grads[name], g, msg=name)


def test_the_serving_query_scores_items_at_their_age_at_the_windows_end() -> None:
    m = aged_model().eval()
    assert m.item_age is not None and m.content_rows is not None
    b = batch(4)
    with torch.no_grad():
        q = m(b)
        assert q.shape == (4, 8 + AGE_BUCKETS)
        u = m.user_vector(b, torch.zeros(4))
        w = m.item_age.weights(u)
        items = m.item_embeddings()
        age = (T_END - m.content_rows.upload_ts[1:]) / DAY
        want = u @ items[1:, :8].T + w[:, age_buckets(age)]
        torch.testing.assert_close(q @ items[1:].T, want)
        assert int(items[UNKNOWN_ITEM, 8:].argmax()) == UNKNOWN_AGE
        assert items[0].abs().sum() == 0  # padding
        # items outside the vocabulary: uploaded after the window's end count as brand new
        other = random_content(3, seed=3, empty_first=False)
        other = replace(other, upload_ts=torch.tensor([T_END + DAY, T_END - 3 * DAY, -math.inf]))
        part = m.content_embeddings(other)[:, 8:]
        assert part.argmax(1).tolist() == [0, 4, UNKNOWN_AGE]
        assert part.sum(1).tolist() == [1.0, 1.0, 1.0]


def test_the_item_age_term_is_refused_with_in_batch_negatives() -> None:
    with pytest.raises(FunnelrecError, match="in_batch_negatives"):
        CandidateConfig(item_content=True, in_batch_negatives=True)
    CandidateConfig(item_content=True, item_age=False, in_batch_negatives=True)
    CandidateConfig(item_content=False, in_batch_negatives=True)  # id-only: no term


def _newest_item_examples(days: range, per_day: int, seed: int) -> CandidateBatch:
    """Examples whose label is the item uploaded that very day (item d on day d)."""
    g = torch.Generator().manual_seed(seed)
    n = len(days) * per_day
    b = batch(n, seed)
    day = torch.tensor(list(days)).repeat_interleave(per_day)
    ts = (day.double() + torch.rand(n, generator=g, dtype=torch.float64) * 0.2) * DAY
    return replace(b, ts=ts.long(), label=day)


def test_a_model_with_the_term_learns_to_retrieve_what_was_just_uploaded() -> None:
    """Every watch is of the item uploaded that day. Trained on days 5-24, then asked on
    days 26-29 to rank the items of days 25 to that day, none of them ever a label and
    their content random: the content model with the term puts the newest first, the one
    without it does no better than chance can."""
    train = _newest_item_examples(range(5, 25), 16, seed=1)
    test = _newest_item_examples(range(26, 30), 16, seed=2)
    newest_first = {}
    for with_age in (True, False):
        m = aged_model(loss="full", item_age=with_age)
        if m.item_age is not None:
            with torch.no_grad():  # from zero, as a new model starts
                m.item_age.weights.weight.zero_()
                m.item_age.weights.bias.zero_()
        opt = torch.optim.Adam(m.parameters(), lr=0.05)
        for _ in range(40):
            opt.zero_grad()
            m.compute_loss(train).backward()
            opt.step()
        m.eval()
        with torch.no_grad():
            # the served scores at each example's time: the query against the items with
            # their age then, items 25 .. the example's day only
            assert m.content_rows is not None
            u = m.user_vector(test, torch.zeros(len(test)))
            scores = u @ m.item_embeddings()[1:, : m.config.dim].T
            if m.item_age is not None:
                age = (test.ts.double()[:, None] - m.content_rows.upload_ts[None, 1:]) / DAY
                scores = scores + m.item_age.weights(u).gather(1, age_buckets(age))
            item = torch.arange(1, INPUTS.item_vocab)
            ranked = (item[None, :] >= 25) & (item[None, :] <= test.label[:, None])
            best = scores.masked_fill(~ranked, -math.inf).argmax(1) + 1
        newest_first[with_age] = float((best == test.label).double().mean())
    # chance: 1/2 to 1/5 on days 26-29
    assert newest_first[True] >= 0.9, newest_first
    assert newest_first[False] <= 0.5, newest_first
