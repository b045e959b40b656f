"""Search query tokeniser: lower-case unigrams and bigrams, an unordered bag (SPEC 2, 2.2).

A query becomes its lower-cased words (runs of letters, digits and underscores) and every
pair of adjacent words joined by one space. Order is thrown away on purpose: the model
sees a bag of tokens, not the last query verbatim, so it cannot simply echo the query's
own result page back (SPEC 2.2).

    tokenize("Funny  Cats, 2024!")  # -> ['funny', 'cats', '2024', 'funny cats', 'cats 2024']

`tokenize_array` does the same for a whole column with Arrow kernels (no Python loop per
query); `tokenize` calls it on one query, so the two can never disagree.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

# Separators are runs of anything that is not a letter, a digit or "_" (Unicode aware).
_SEPARATOR = r"[^\pL\pN_]+"


def tokenize_array(queries: pa.Array | pa.ChunkedArray) -> tuple[pa.Array, np.ndarray]:
    """Tokens of each query: (flat tokens [T] string, offsets [Q + 1] int64).

    Tokens of query q are `flat[offsets[q]:offsets[q + 1]]`: its unigrams in order, then its
    bigrams. Null queries have no tokens.
    """
    if isinstance(queries, pa.ChunkedArray):
        queries = queries.combine_chunks() if queries.num_chunks != 1 else queries.chunk(0)
    queries = pc.fill_null(queries.cast(pa.string()), "")
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


def tokenize(query: str) -> list[str]:
    """Tokens of one query: lower-cased unigrams, then bigrams."""
    tokens, _ = tokenize_array(pa.array([query], type=pa.string()))
    return [str(t) for t in tokens.to_pylist()]
