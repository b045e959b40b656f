"""Query tokeniser: lower-case unigrams and bigrams, vectorised and scalar paths agree."""

from __future__ import annotations

import itertools

import pyarrow as pa

from funnelrec.tokenize import tokenize, tokenize_array


def test_unigrams_then_bigrams_lower_case() -> None:
    assert tokenize("Funny  Cats, 2024!") == [
        "funny", "cats", "2024", "funny cats", "cats 2024",
    ]  # fmt: skip
    assert tokenize("ÜBER straße") == ["über", "straße", "über straße"]
    assert tokenize("one") == ["one"]
    assert tokenize("") == [] and tokenize("  ,;! ") == []


def test_bag_keeps_no_order_beyond_adjacent_pairs() -> None:
    # Word order survives only inside bigrams: the unigram bag is the same for any order.
    assert sorted(tokenize("cats funny")[:2]) == sorted(tokenize("funny cats")[:2])
    assert "funny cats" not in tokenize("cats funny")


def test_array_matches_scalar_and_offsets() -> None:
    queries = ["a b", None, "", "x", "C d-e", "  lead and trail  "]
    tokens, offsets = tokenize_array(pa.array(queries, type=pa.string()))
    assert offsets.tolist()[0] == 0 and len(offsets) == len(queries) + 1
    flat = tokens.to_pylist()
    for q, (lo, hi) in zip(queries, itertools.pairwise(offsets), strict=True):
        assert flat[lo:hi] == (tokenize(q) if q is not None else [])
    assert flat[offsets[4] : offsets[5]] == ["c", "d", "e", "c d", "d e"]
    empty_tokens, empty_offsets = tokenize_array(pa.array([], type=pa.string()))
    assert len(empty_tokens) == 0 and empty_offsets.tolist() == [0]
    chunked = pa.chunked_array([pa.array(["a b"]), pa.array(["c"])])
    assert tokenize_array(chunked)[0].to_pylist() == ["a", "b", "a b", "c"]
