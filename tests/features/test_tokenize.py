"""Query tokeniser: lower-case unigrams and bigrams, vectorised and scalar paths agree."""

from __future__ import annotations

import itertools

import numpy as np
import pyarrow as pa

from funnelrec.features.tokenize import tokenize, tokenize_array


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


VARIED = [
    "Funny  Cats, 2024!",
    "ÜBER straße",
    "İstanbul ΣΊΣΥΦΟΣ",  # Arrow lower-cases one code point at a time: no final sigma
    "日本語の テスト、東京",
    "emoji 🙂 between😀words",
    "tab\tnew\nline\r\x0bvertical",
    "non\u00a0breaking\u2003em\u3000ideographic",
    "combining e\u0301 and a\u0308",
    "snake_case __dunder__ -dash- a.b,c;d:e",
    "superscript² circled① roman Ⅻ arabic ٣٤ fraction ½",
    "ǅungla ǈ titlecase ß ẞ ﬁ ligature",
    "zero\u200bwidth joiner\u200d",
    "",
    "   ",
    "!!!",
    "x",
    None,
]


def test_python_and_arrow_paths_give_the_same_tokens() -> None:
    from funnelrec.features.tokenize import _tokenize_arrow, _tokenize_python

    rng = np.random.default_rng(0)
    # A sample of all of Unicode (surrogates excepted), in queries of 12 code points.
    cps = np.concatenate([np.arange(0, 0x3000), rng.integers(0x3000, 0x110000, 20_000)])
    cps = cps[(cps < 0xD800) | (cps > 0xDFFF)]
    text = cps.astype("<u4").tobytes().decode("utf-32-le")
    queries = VARIED + [text[i : i + 12] for i in range(0, len(text), 12)]
    arrow_tokens, arrow_offsets = _tokenize_arrow(pa.array(queries, type=pa.string()))
    py_tokens, py_offsets = _tokenize_python(queries)
    assert py_tokens.to_pylist() == arrow_tokens.to_pylist()
    assert py_offsets.tolist() == arrow_offsets.tolist()
    # tokenize_array picks a path by size; the result does not depend on it
    few, many = pa.array(VARIED, pa.string()), pa.array(VARIED * 200, pa.string())
    tokens_few, offsets_few = tokenize_array(few)
    tokens_many, offsets_many = tokenize_array(many)
    assert tokens_many.to_pylist() == tokens_few.to_pylist() * 200
    assert offsets_many[len(VARIED)] == offsets_few[-1]
    assert tokenize("İstanbul ΣΊΣΥΦΟΣ") == [
        "istanbul", "σίσυφοσ", "istanbul σίσυφοσ",
    ]  # fmt: skip
