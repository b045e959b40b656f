"""Vocabularies: top-N by training frequency, 0 = OOV, plain files, the embedding width rule."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from funnelrec.errors import ArtifactError, FunnelrecError
from funnelrec.features.vocab import Vocabulary, embedding_dim


def test_fit_orders_by_frequency_then_value_and_truncates() -> None:
    values = pa.array([5, 3, 3, 9, 9, 9, 7, 4, None], type=pa.int64())
    v = Vocabulary.fit("item", values, max_size=3)
    assert v.values.tolist() == [9, 3, 4]  # 9 x3, 3 x2, then 4 before 5 and 7 (ties by value)
    assert len(v) == 4  # ids 0..3
    # counts[0] = occurrences that fell out of the vocabulary (5 and 7); nulls are not counted
    assert v.counts.tolist() == [2, 3, 2, 1]
    assert v.lookup(pa.array([9, 3, 4, 5, 7, 100, None], type=pa.int64())).tolist() == [
        1, 2, 3, 0, 0, 0, 0,
    ]  # fmt: skip


def test_min_count_and_strings() -> None:
    v = Vocabulary.fit("region", pa.array(["de", "fr", "de", "us", None, "de", "fr"]), min_count=2)
    assert v.kind == "str"
    assert v.values.tolist() == ["de", "fr"]
    assert v.lookup(pa.array(["fr", "us", None, "xx"])).tolist() == [2, 0, 0, 0]
    assert v.lookup(np.array(["de"], dtype=object)).dtype == np.int32
    assert v.decode(np.array([2, 1])).tolist() == ["fr", "de"]
    with pytest.raises(FunnelrecError):
        v.decode(np.array([0]))


def test_weighted_fit_and_oov_rate() -> None:
    v = Vocabulary.fit("t", np.array([1, 2, 2]), weights=np.array([10.0, 1.0, 1.0]))
    assert v.values.tolist() == [1, 2]
    assert v.counts.tolist() == [0.0, 10.0, 2.0]
    assert v.oov_rate(np.array([1, 3, 4, 2])) == 0.5


def test_lookup_rejects_wrong_kind() -> None:
    v = Vocabulary.fit("item", np.array([1, 2]))
    with pytest.raises(FunnelrecError):
        v.lookup(pa.array(["a"]))


@pytest.mark.parametrize(
    "values",
    [pa.array([4, 4, 8, 15, 16, 23, 42, 42, 42], type=pa.int64()), pa.array(["b", "a", "b", "ü"])],
)
def test_save_load_round_trip(tmp_path, values) -> None:
    v = Vocabulary.fit("x", values)
    v.save(tmp_path / "x.parquet")
    w = Vocabulary.load(tmp_path / "x.parquet")
    assert (w.name, w.kind) == (v.name, v.kind)
    assert w.values.tolist() == v.values.tolist()
    assert w.counts.tolist() == v.counts.tolist()
    assert w.lookup(values).tolist() == v.lookup(values).tolist()
    assert not list(tmp_path.glob(".*"))  # no temporary file left behind


def test_load_rejects_foreign_or_newer_files(tmp_path) -> None:
    pq.write_table(pa.table({"id": [0], "value": [None], "count": [0]}), tmp_path / "a.parquet")
    with pytest.raises(ArtifactError, match="not a funnelrec vocabulary"):
        Vocabulary.load(tmp_path / "a.parquet")
    v = Vocabulary.fit("x", np.array([1]))
    v.save(tmp_path / "b.parquet")
    t = pq.read_table(tmp_path / "b.parquet")
    meta = json.loads(t.schema.metadata[b"funnelrec.vocabulary"])
    meta["format_version"] = 99
    pq.write_table(
        t.replace_schema_metadata({"funnelrec.vocabulary": json.dumps(meta)}),
        tmp_path / "b.parquet",
    )
    with pytest.raises(ArtifactError, match="format version 99"):
        Vocabulary.load(tmp_path / "b.parquet")
    with pytest.raises(ArtifactError):
        Vocabulary.load(tmp_path / "missing.parquet")


def test_embedding_dim_rule() -> None:
    # Documented points of the rule: proportional to log2(cardinality), multiple of 4, clipped.
    assert [embedding_dim(n) for n in (1, 5, 50, 10_000, 100_000, 1_000_000)] == [
        4, 4, 12, 24, 28, 32,
    ]  # fmt: skip
    dims = [embedding_dim(n) for n in np.unique(np.logspace(0, 9, 60).astype(int))]
    assert dims == sorted(dims) and all(d % 4 == 0 for d in dims)
    assert embedding_dim(10**9) == 48 and embedding_dim(10**12, maximum=32) == 32
    assert embedding_dim(1000, scale=4.0, multiple=1) == 40
    assert Vocabulary.fit("x", np.arange(1, 50)).embedding_dim(minimum=16) == 16
    with pytest.raises(FunnelrecError):
        embedding_dim(0)


def _reference_lookup(v: Vocabulary, values: pa.Array) -> list[int]:
    """The mapping by definition: position in the values + 1, 0 for nulls and the rest."""
    value_type = pa.int64() if v.kind == "int" else pa.string()
    value_set = pa.array(v.values.tolist(), type=value_type)
    idx = pc.index_in(values.cast(value_type), value_set=value_set)
    return pc.fill_null(pc.add(idx, 1), 0).to_pylist()


@pytest.mark.parametrize(
    "vocab_values",
    [
        np.arange(1, 5000),  # dataset ids: a dense table
        np.array([7, -3, 10**12, 5, 5, 2**40]),  # a wide span: binary search
        np.array([], dtype=np.int64),
    ],
)
def test_int_lookup_equals_the_definition(vocab_values: np.ndarray) -> None:
    v = Vocabulary.fit("x", pa.array(vocab_values, type=pa.int64()), max_size=4000)
    rng = np.random.default_rng(0)
    probe = np.concatenate([vocab_values, rng.integers(-10, 6000, 500), [10**12, 2**40, -(2**62)]])
    mask = rng.random(probe.size) < 0.1
    arrow = pa.array(probe.astype(np.int64), mask=mask)
    assert v.lookup(arrow).tolist() == _reference_lookup(v, arrow)
    assert v.lookup(probe).tolist() == _reference_lookup(v, pa.array(probe.astype(np.int64)))
    small = probe[np.abs(probe) < 2**31]
    assert v.lookup(small.astype(np.int32)).tolist() == v.lookup(small).tolist()
    many = np.tile(probe, 70_000 // len(probe) + 1)  # past the binary-search size
    assert v.lookup(many).tolist() == _reference_lookup(v, pa.array(many.astype(np.int64)))
    chunked = pa.chunked_array([arrow.slice(0, 7), arrow.slice(7)])
    assert v.lookup(chunked).tolist() == v.lookup(arrow).tolist()
    assert v.lookup(pa.array([None, None])).tolist() == [0, 0]  # all-null: no type to check
    assert v.lookup(np.zeros(0, dtype=np.int64)).dtype == np.int32


def test_string_lookup_equals_the_definition_for_few_and_many_values() -> None:
    words = [f"w{i}" for i in range(300)] + ["ü", "日本", ""]
    v = Vocabulary.fit("t", pa.array(words * 2 + words[:50]), max_size=250)
    rng = np.random.default_rng(1)
    probe = [words[i] if i < len(words) else None for i in rng.integers(0, 320, 9000)]
    for n in (1, 20, 9000):  # the per-call dict and Arrow's hash lookup
        arr = pa.array(probe[:n], type=pa.string())
        assert v.lookup(arr).tolist() == _reference_lookup(v, arr)
        assert v.lookup(np.array(probe[:n], dtype=object)).tolist() == v.lookup(arr).tolist()
    large = pa.array(probe[:30], type=pa.large_string())
    assert v.lookup(large).tolist() == _reference_lookup(v, large)
