"""Search query tokeniser: lower-case unigrams and bigrams, an unordered bag.

The search history input of candidate generation (Covington et al. 2016, section 3.2). A
query becomes its lower-cased words (runs of letters, digits and underscores) and every
pair of adjacent words joined by one space. Order is thrown away on purpose: the model
sees a bag of tokens, not the last query verbatim, so it cannot simply echo the query's
own result page back (section 3.4).

    tokenize("Funny  Cats, 2024!")  # -> ['funny', 'cats', '2024', 'funny cats', 'cats 2024']

`tokenize_array` does the same for a whole column. Two paths give the same tokens:
- many queries (building training examples): Arrow kernels, no Python loop per query;
  Arrow compiles the separator regex on every call, small next to a column's work
  (docs/features.md, the query tokeniser);
- a few queries (one request at serving time): plain Python over a per-character table,
  so a request does not pay that compilation. The table is filled from Arrow itself the
  first time a character is met (lower-casing and the letter/digit classes are exactly
  Arrow's, whose Unicode tables can be newer than Python's own).
`tokenize` calls `tokenize_array` on one query, so the two can never disagree.
"""

from __future__ import annotations

import itertools
import threading

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

# Separators are runs of anything that is not a letter, a digit or "_" (Unicode aware).
_SEPARATOR = r"[^\pL\pN_]+"
# Up to this many queries go through the per-character path.
_SMALL = 1024


def tokenize_array(queries: pa.Array | pa.ChunkedArray) -> tuple[pa.Array, np.ndarray]:
    """Tokens of each query: (flat tokens [T] string, offsets [Q + 1] int64).

    Tokens of query q are `flat[offsets[q]:offsets[q + 1]]`: its unigrams in order, then its
    bigrams. Null queries have no tokens.
    """
    if isinstance(queries, pa.ChunkedArray):
        queries = queries.combine_chunks() if queries.num_chunks != 1 else queries.chunk(0)
    queries = queries.cast(pa.string())
    if len(queries) <= _SMALL:
        return _tokenize_python(queries.to_pylist())
    return _tokenize_arrow(queries)


def tokenize(query: str) -> list[str]:
    """Tokens of one query: lower-cased unigrams, then bigrams."""
    tokens, _ = tokenize_array(pa.array([query], type=pa.string()))
    return [str(t) for t in tokens.to_pylist()]


def _tokenize_arrow(queries: pa.Array) -> tuple[pa.Array, np.ndarray]:
    """`tokenize_array` with Arrow kernels (string array in)."""
    queries = pc.fill_null(queries, "")
    n = len(queries)
    if n == 0:
        return pa.array([], type=pa.string()), np.zeros(1, dtype=np.int64)
    parts = pc.split_pattern_regex(pc.utf8_lower(queries), pattern=_SEPARATOR)
    offs = np.asarray(parts.offsets.to_numpy(), dtype=np.int64)
    words = parts.values.slice(int(offs[0]), int(offs[-1] - offs[0]))
    owner = np.repeat(np.arange(n, dtype=np.int64), np.diff(offs))
    # Leading/trailing separators leave empty strings; drop them.
    keep = np.asarray(pc.greater(pc.utf8_length(words), 0).to_numpy(zero_copy_only=False))
    words = words.filter(pa.array(keep))
    owner = owner[keep]
    # Bigrams: adjacent words of the same query.
    same = owner[1:] == owner[:-1] if owner.size > 1 else np.zeros(0, dtype=bool)
    left = np.flatnonzero(same)
    bigrams = pc.binary_join_element_wise(
        words.take(pa.array(left)), words.take(pa.array(left + 1)), " "
    )
    tokens = pa.concat_arrays([words, bigrams.cast(pa.string())])
    token_owner = np.concatenate([owner, owner[left]])
    order = np.argsort(token_owner, kind="stable")  # unigrams stay before bigrams
    tokens = tokens.take(pa.array(order))
    counts = np.bincount(token_owner, minlength=n)
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    return tokens, offsets


def _tokenize_python(queries: list[str | None]) -> tuple[pa.Array, np.ndarray]:
    """`tokenize_array` in plain Python (a list of queries in), the same tokens."""
    other = [q for q in queries if q and not q.isascii()]
    if other:
        new = {ch for ch in set().union(*map(set, other)) if ord(ch) not in _CHARS}
        if new:
            _learn(sorted(new))
    flat: list[str] = []
    offsets = np.zeros(len(queries) + 1, dtype=np.int64)
    for q, query in enumerate(queries):
        if query:
            words = [w for w in query.translate(_CHARS).split(" ") if w]
            flat += words
            flat += [f"{a} {b}" for a, b in itertools.pairwise(words)]
        offsets[q + 1] = len(flat)
    return pa.array(flat, type=pa.string()), offsets


# Code point -> what it becomes: its lower case when it belongs to a word, " " when it
# separates words. ASCII is filled here; other characters from Arrow on first sight.
_CHARS: dict[int, str] = {
    c: (chr(c).lower() if chr(c).isalnum() or c == ord("_") else " ") for c in range(128)
}
_CHARS_LOCK = threading.Lock()


def _learn(chars: list[str]) -> None:
    """Add characters to the table, as Arrow lower-cases and classifies them."""
    arr = pa.array(chars, type=pa.string())
    lower = pc.utf8_lower(arr)
    # Arrow maps each code point to one (its simple case mapping), so a per-character
    # table reproduces lower-casing a whole string; the class is tested on the result,
    # as the regex runs on the lower-cased query.
    is_word = pc.match_substring_regex(lower, pattern=r"^[\pL\pN_]$").to_pylist()
    with _CHARS_LOCK:
        for c, low, word in zip(chars, lower.to_pylist(), is_word, strict=True):
            _CHARS[ord(c)] = low if word else " "
